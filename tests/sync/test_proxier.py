"""The Proxier's sync without the kernel: what a periodic full resync costs in memory, and
changes recorded while rules are being written (a stand-in runner holds the write open)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from rapproxy.config import ProxySettings, RapproxyConfiguration, RelayEngine
from rapproxy.dataplane.native import NativeTcpRelayServer
from rapproxy.dataplane.tcp import TcpRelayServer
from rapproxy.model.service import L4Protocol, ServicePortName
from rapproxy.model.table import ServiceTable
from rapproxy.rules.render import RedirectTarget, RuleConfig
from rapproxy.sync.proxier import Proxier, udp_socket_name


def service(i: int) -> dict[str, Any]:
    return {
        "metadata": {"namespace": "default", "name": f"s{i}"},
        "spec": {"clusterIP": f"10.96.0.{i}", "ports": [{"port": 80, "targetPort": 8080}]},
    }


def endpoint_slice(i: int, *ips: str) -> dict[str, Any]:
    return {
        "metadata": {
            "namespace": "default",
            "name": f"s{i}-abc",
            "labels": {"kubernetes.io/service-name": f"s{i}"},
        },
        "addressType": "IPv4",
        "ports": [{"port": 8080}],
        "endpoints": [{"addresses": [ip]} for ip in ips],
    }


def name(i: int) -> ServicePortName:
    return ServicePortName("default", f"s{i}", "", L4Protocol.TCP)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def proxier(clock: Clock) -> Proxier:
    proxier = Proxier(RapproxyConfiguration(), "node", clock=clock)
    for i in range(3):
        proxier.tracker.service_updated(service(i))
        proxier.tracker.slice_updated(endpoint_slice(i, f"10.244.0.{i}"))
    return proxier


def record_updates(proxier: Proxier, monkeypatch: pytest.MonkeyPatch) -> list[set[Any] | None]:
    calls: list[set[Any] | None] = []
    update = proxier.balancer.update

    def recording(table: ServiceTable, changed: Any = None) -> None:
        calls.append(None if changed is None else set(changed))
        update(table, changed)

    monkeypatch.setattr(proxier.balancer, "update", recording)
    return calls


async def test_periodic_full_resync_updates_the_balancer_with_only_the_changed_ports(
    proxier: Proxier, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = record_updates(proxier, monkeypatch)
    await proxier.sync()  # the first sync: the balancer has no snapshot yet
    clock.now += proxier.config.iptables.sync_period
    proxier.tracker.slice_updated(endpoint_slice(1, "10.244.0.9"))
    await proxier.sync()
    assert proxier._last_full_sync == clock.now  # it was the periodic full resync
    assert calls == [None, {name(1)}]
    choice = proxier.balancer.choose(name(1), "192.168.0.1", clock.now)
    assert choice is not None and choice.endpoint.ip == "10.244.0.9"


async def test_a_balancer_that_missed_a_step_is_updated_whole(
    proxier: Proxier, monkeypatch: pytest.MonkeyPatch
) -> None:
    await proxier.sync()
    calls = record_updates(proxier, monkeypatch)
    proxier.tracker.slice_updated(endpoint_slice(1, "10.244.0.9"))
    proxier.tracker.take_change()  # consumed elsewhere: the next change is not one step on
    proxier.tracker.slice_updated(endpoint_slice(2, "10.244.0.8"))
    await proxier.sync()
    assert calls == [None]
    for i, ip in ((1, "10.244.0.9"), (2, "10.244.0.8")):
        choice = proxier.balancer.choose(name(i), "192.168.0.1", 0.0)
        assert choice is not None and choice.endpoint.ip == ip


# -- changes recorded while rules are being written ------------------------------------------------


class HeldRules:
    """Stands in for an IptablesRunner: each write waits until the test lets it finish."""

    family = 4

    def __init__(self) -> None:
        self.writing = asyncio.Event()
        self.finish = asyncio.Event()
        self.error: Exception | None = None
        self.writes: list[tuple[set[ServicePortName], bool]] = []
        self.cancelled = False

    async def sync(
        self, targets: Sequence[RedirectTarget], config: RuleConfig, *, repair_jumps: bool = True
    ) -> bool:
        self.writes.append(({t.service_port.name for t in targets}, repair_jumps))
        self.writing.set()
        try:
            await self.finish.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        self.writing.clear()
        if self.error is not None:
            raise self.error
        return True


async def wait_for(condition: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.001)


def chosen_ip(proxier: Proxier, i: int) -> str | None:
    choice = proxier.balancer.choose(name(i), "192.168.0.1", 0.0)
    return choice.endpoint.ip if choice is not None else None


def programmed(proxier: Proxier) -> float:
    count = proxier.metrics.registry.get_sample_value(
        "rapproxy_network_programming_duration_seconds_count"
    )
    return count or 0.0


@pytest.fixture
async def held(clock: Clock) -> tuple[Proxier, HeldRules]:
    """A synced Proxier whose next sync is the periodic full resync."""
    rules = HeldRules()
    proxier = Proxier(RapproxyConfiguration(), "node", iptables=[rules], clock=clock)  # type: ignore[list-item]
    for i in range(3):
        proxier.tracker.service_updated(service(i))
        proxier.tracker.slice_updated(endpoint_slice(i, f"10.244.0.{i}"))
    rules.finish.set()
    await proxier.sync()
    rules.finish.clear()
    clock.now += proxier.config.iptables.sync_period
    return proxier, rules


async def test_endpoint_change_during_a_full_resync_is_applied_without_waiting_for_the_rules(
    held: tuple[Proxier, HeldRules],
) -> None:
    proxier, rules = held
    syncing = asyncio.create_task(proxier.sync())
    await rules.writing.wait()
    before = programmed(proxier)
    proxier.tracker.slice_updated(endpoint_slice(1, "10.244.0.9"))
    proxier.note_change()
    await wait_for(lambda: chosen_ip(proxier, 1) == "10.244.0.9")
    assert not syncing.done()  # the rules are still being written
    assert programmed(proxier) == before + 1  # an endpoint change needs nothing more
    rules.finish.set()
    await syncing
    assert [repair for _, repair in rules.writes] == [True, True]  # no extra write for it
    assert proxier.tracker.pending == 0
    assert proxier.health.oldest_pending is None


async def test_new_service_during_a_rules_write_gets_its_rules_from_the_next_sync(
    held: tuple[Proxier, HeldRules],
) -> None:
    proxier, rules = held
    syncing = asyncio.create_task(proxier.sync())
    await rules.writing.wait()
    proxier.tracker.service_updated(service(3))
    proxier.tracker.slice_updated(endpoint_slice(3, "10.244.0.3"))
    proxier.note_change()
    await wait_for(lambda: chosen_ip(proxier, 3) == "10.244.0.3")
    rules.finish.set()
    await syncing
    assert name(3) not in rules.writes[-1][0]
    assert proxier.health.oldest_pending is not None  # not finished: no rule for it yet
    before = programmed(proxier)
    await proxier.sync()  # the runner was asked for it when the change was recorded
    assert rules.writes[-1] == ({name(i) for i in range(4)}, False)
    assert proxier.health.oldest_pending is None
    assert programmed(proxier) == before + 1


async def test_failed_write_fails_the_sync_and_keeps_what_was_absorbed(
    held: tuple[Proxier, HeldRules],
) -> None:
    proxier, rules = held
    rules.error = RuntimeError("iptables-restore exited 4")
    syncing = asyncio.create_task(proxier.sync())
    await rules.writing.wait()
    proxier.tracker.slice_updated(endpoint_slice(1, "10.244.0.9"))
    proxier.note_change()
    await wait_for(lambda: chosen_ip(proxier, 1) == "10.244.0.9")
    rules.finish.set()
    with pytest.raises(RuntimeError, match="exited 4"):
        await syncing
    assert proxier.last_sync_error == "RuntimeError: iptables-restore exited 4"
    rules.error = None
    await proxier.sync()  # the retry: still the full resync, since that one failed
    assert rules.writes[-1][1] is True
    assert chosen_ip(proxier, 1) == "10.244.0.9"


async def test_cancelled_sync_cancels_its_rules_write(held: tuple[Proxier, HeldRules]) -> None:
    proxier, rules = held
    syncing = asyncio.create_task(proxier.sync())
    await rules.writing.wait()
    syncing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await syncing
    assert rules.cancelled


async def test_handed_over_udp_sockets_keep_their_ports_and_stale_ones_are_closed() -> None:
    inherited = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    inherited.bind(("127.0.0.1", 0))
    port = inherited.getsockname()[1]
    gone = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    # The range holds only the inherited socket's port: a fresh bind there would fail
    # (EADDRINUSE), so the service port can only be served by adopting the socket.
    config = RapproxyConfiguration(
        proxy=ProxySettings(listen_address="127.0.0.1", udp_port_range=f"{port}-{port}")
    )
    proxier = Proxier(config, "node")
    proxier.tracker.service_updated(
        {
            "metadata": {"namespace": "default", "name": "dns"},
            "spec": {"clusterIP": "10.96.0.53", "ports": [{"port": 53, "protocol": "UDP"}]},
        }
    )
    dns = ServicePortName("default", "dns", "", L4Protocol.UDP)
    await proxier.start(
        [("127.0.0.1", 0)],
        inherited_udp={udp_socket_name(dns): inherited, "udp default/gone:": gone},
    )
    try:
        await proxier.sync()
        assert proxier.udp[dns].address == ("127.0.0.1", port)
        assert gone.fileno() == -1, "a socket for a service port that is gone is closed"
        assert udp_socket_name(dns) in proxier.listening_descriptors()
        proxier.stop_accepting()
        assert proxier.listening_descriptors() == {}, "a draining proxy offers nothing"
    finally:
        await proxier.aclose()


@pytest.mark.parametrize(
    ("engine", "server_type"),
    [(RelayEngine.NATIVE, NativeTcpRelayServer), (RelayEngine.ASYNCIO, TcpRelayServer)],
)
def test_the_tcp_relay_engine_is_the_configured_one(engine: RelayEngine, server_type: type) -> None:
    config = RapproxyConfiguration(proxy=ProxySettings(relay_engine=engine))
    assert type(Proxier(config, "node").tcp) is server_type
