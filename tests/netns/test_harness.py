"""The network-namespace harness keeps its promises: isolation, unique names, full cleanup."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable

import pytest
from pyroute2 import netns as pyroute2_netns

from rapproxy.testing.netns import (
    Namespace,
    NamespaceError,
    live_namespaces,
    namespace,
    sweep_stale_namespaces,
)

pytestmark = pytest.mark.root

MakeNamespace = Callable[..., Awaitable[Namespace]]


def interface_names() -> list[str]:
    """Runs inside a namespace through `Namespace.call` (module level, so it pickles)."""
    return sorted(name for _, name in socket.if_nameindex())


def wait_until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1].startswith("Z")
    except FileNotFoundError:
        return True


async def test_namespace_exists_while_alive_and_is_removed_by_destroy() -> None:
    ns = await Namespace.create("probe")
    try:
        assert ns.name in pyroute2_netns.listnetns()
        assert ns.name in live_namespaces()
        assert ns.name.startswith(f"rap-{os.getpid()}-")
    finally:
        ns.destroy()
    assert ns.name not in pyroute2_netns.listnetns()
    assert ns.name not in live_namespaces()
    ns.destroy()  # idempotent


async def test_names_are_unique_within_a_process(make_namespace: MakeNamespace) -> None:
    names = {(await make_namespace()).name for _ in range(3)}
    assert len(names) == 3


async def test_context_manager_destroys_the_namespace_when_the_body_fails() -> None:
    with pytest.raises(RuntimeError, match="boom"):
        async with namespace("failing") as ns:
            name = ns.name
            raise RuntimeError("boom")
    assert name not in pyroute2_netns.listnetns()


async def test_destroy_kills_processes_started_inside_and_their_children() -> None:
    ns = await Namespace.create()
    try:
        shell = ns.popen(["sh", "-c", "sleep 300 & sleep 300 & wait"])
        wait_until(lambda: len(ns.pids()) >= 3)  # the shell and both of its children
        inside = ns.pids()
        spawned = await ns.spawn(["sleep", "300"])
    finally:
        await ns.aclose()
    assert shell.returncode is not None
    assert spawned.returncode is not None
    wait_until(lambda: all(gone(pid) for pid in inside))


async def test_a_fresh_namespace_has_only_loopback_up_and_no_routes_out(netns: Namespace) -> None:
    assert await netns.call(interface_names) == ["lo"]
    assert netns.run(["ip", "route", "show", "default"]).stdout == ""
    assert "UP" in netns.run(["ip", "link", "show", "lo"]).stdout


def sleep_then_say(seconds: float, word: str) -> str:
    time.sleep(seconds)  # a long call, as a load lasting until an event is
    return word


async def test_a_long_call_does_not_hold_back_a_short_one(netns: Namespace) -> None:
    long = asyncio.ensure_future(netns.call(sleep_then_say, 6.0, "long"))
    await asyncio.sleep(0.5)  # the long call is submitted first and is running
    started = time.monotonic()
    # The second worker starts on demand (a spawned interpreter: about a second here).
    assert await netns.call(sleep_then_say, 0.0, "short") == "short"
    assert time.monotonic() - started < 4.0
    assert not long.done()
    assert await long == "long"


async def test_veth_pair_connects_two_namespaces(make_namespace: MakeNamespace) -> None:
    left, right = await make_namespace("left"), await make_namespace("right")
    veth = await left.add_veth_peer(right, "10.201.0.1", "10.201.0.2", 30)
    assert veth.ifname in await left.call(interface_names)
    assert veth.peer_ifname in await right.call(interface_names)

    listener = right.socket()
    client = left.socket()
    with listener, client:
        listener.bind(("10.201.0.2", 0))
        listener.listen(1)
        listener.setblocking(False)
        client.setblocking(False)
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.sock_connect(client, listener.getsockname()), 5)
        accepted, peer = await asyncio.wait_for(loop.sock_accept(listener), 5)
        accepted.close()
        assert peer[0] == "10.201.0.1"


async def test_routes_can_point_at_a_neighbour_but_never_be_default(
    make_namespace: MakeNamespace,
) -> None:
    left, right = await make_namespace(), await make_namespace()
    veth = await left.add_veth_peer(right, "10.202.0.1", "10.202.0.2")
    await left.add_route("10.97.0.0/16", via="10.202.0.2")
    await left.add_route("10.98.0.0/16", dev=veth.ifname)
    routes = left.run(["ip", "route"]).stdout
    assert "10.97.0.0/16 via 10.202.0.2" in routes
    assert "10.98.0.0/16 dev" in routes
    for default in ("0.0.0.0/0", "::/0"):
        with pytest.raises(NamespaceError, match="default route"):
            await left.add_route(default, via="10.202.0.2")
    assert left.run(["ip", "route", "show", "default"]).stdout == ""


async def test_local_route_delivers_a_whole_cidr_locally(netns: Namespace) -> None:
    await netns.add_local_route("10.96.0.0/16")
    await netns.add_local_route("fd00:96::/112")
    loop = asyncio.get_running_loop()
    for family, wildcard, somewhere in [
        (socket.AF_INET, "0.0.0.0", "10.96.3.4"),
        (socket.AF_INET6, "::", "fd00:96::7"),
    ]:
        listener, client = netns.socket(family), netns.socket(family)
        with listener, client:
            listener.bind((wildcard, 0))
            listener.listen(1)
            client.setblocking(False)
            port = listener.getsockname()[1]
            await asyncio.wait_for(loop.sock_connect(client, (somewhere, port)), 5)


async def test_exec_runs_a_command_inside(netns: Namespace) -> None:
    result = await netns.exec(["ip", "-o", "link"])
    assert result.stdout.count(": ") >= 1
    assert "lo:" in result.stdout
    with pytest.raises(subprocess.CalledProcessError):
        await netns.exec(["false"])


async def test_sweep_removes_namespaces_of_dead_processes_only() -> None:
    finished = await asyncio.create_subprocess_exec("true")
    await finished.wait()
    dead = f"rap-{finished.pid}-0"
    alive = f"rap-{os.getpid()}-999999"
    pyroute2_netns.create(dead)
    pyroute2_netns.create(alive)
    try:
        removed = sweep_stale_namespaces()
        assert dead in removed
        assert alive not in removed
        assert alive in pyroute2_netns.listnetns()
    finally:
        for name in (dead, alive):
            if name in pyroute2_netns.listnetns():
                pyroute2_netns.remove(name)
