"""The emulated WAN: a router namespace joining the sites, with delay and bandwidth per link.

Topology (site i = node or client number i):

    site i: wan0 10.10.i.2/24 ──veth── router: w<i> 10.10.i.1/24
    site i routes 10.10.0.0/16 and 10.244.0.0/16 via 10.10.i.1 (never a default route)
    router routes each site's extra prefixes (a node's pod CIDR) via 10.10.i.2

Delay: the router's policy routing sends every packet arriving on a site's veth
(`ip rule iif w<i> lookup 100`) to table 100, whose only routes send the emulated supernets
(10.10.0.0/16, 10.244.0.0/16) into the TUN device `tunwan`. The forwarder process
(`forwarder.py`) reads each packet, holds it for the one-way delay between its source and
destination sites, and writes it back; coming in from the TUN it matches no rule and the main
table routes it out of the destination's veth. Table 100 holds no default route, and the router
has none in its main table: packets for anything outside the closed world find no route.
The router's own addresses (10.10.i.1, and 10.10.0.1 on its loopback for control-plane
services such as the emulated API server) are local, so they are reached without delay.

Bandwidth: `tbf` on both ends of a site's link (the router side shapes what the site downloads,
the site side what it uploads).

Delays change at runtime through the forwarder's control socket (`set_delays`); the call returns
once the forwarder applies them to the next packet it reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rapproxy.testing.edge.delays import DelayMatrix, Site, WanConfig
from rapproxy.testing.netns import Namespace

WAN_SUPERNET = "10.10.0.0/16"
POD_SUPERNET = "10.244.0.0/16"
CONTROL_IP = "10.10.0.1"
TUN_NAME = "tunwan"
DELAY_TABLE = 100
SITE_IFNAME = "wan0"
_TUN_QUEUE = 10000
_FORWARDER_START_SECONDS = 15.0
_CONTROL_SECONDS = 5.0


class WanError(RuntimeError):
    """The WAN could not be built or the forwarder did not answer; the message says which."""


@dataclass(frozen=True, slots=True)
class WanLink:
    """A site's access link: its veth at the router and at the site, and their addresses."""

    site: str
    index: int
    router_ifname: str
    site_ifname: str
    router_ip: str
    site_ip: str
    prefixes: tuple[str, ...]


def link_addresses(index: int) -> tuple[str, str]:
    """(router, site) addresses of link `index`: 10.10.index.1 and 10.10.index.2."""
    if not 1 <= index <= 254:
        raise WanError(f"link index {index}: must be in 1..254")
    return f"10.10.{index}.1", f"10.10.{index}.2"


class Wan:
    """The router namespace, its TUN delay line and the links to every attached site."""

    def __init__(self, router: Namespace, workdir: Path) -> None:
        self.router = router
        self.workdir = workdir
        self.control_path = workdir / "wan.sock"
        self.links: dict[str, WanLink] = {}
        self.config = WanConfig()
        self.bandwidth_mbit: dict[str, float] = {}
        self.bias_us = 0.0
        self._forwarder: asyncio.subprocess.Process | None = None

    @classmethod
    async def create(cls, workdir: Path, *, bias_ms: float | None = None) -> Wan:
        """A router with its TUN device and running forwarder; no sites yet."""
        router = await Namespace.create("wan-router")
        wan = cls(router, workdir)
        try:
            await wan._build_router(bias_ms)
        except BaseException:
            await wan.aclose()
            raise
        return wan

    async def _build_router(self, bias_ms: float | None) -> None:
        r = self.router
        await r.exec(
            [
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
            ]
        )
        await r.exec(["ip", "tuntap", "add", "dev", TUN_NAME, "mode", "tun"])
        await r.exec(["ip", "link", "set", TUN_NAME, "txqueuelen", str(_TUN_QUEUE), "up"])
        await r.add_address("lo", f"{CONTROL_IP}/32")
        for supernet in (WAN_SUPERNET, POD_SUPERNET):
            # Table 100 only: the diversion into the delay line, never consulted for packets
            # coming back out of the TUN (no rule matches iif tunwan).
            await r.exec(
                ["ip", "route", "add", supernet, "dev", TUN_NAME, "table", str(DELAY_TABLE)]
            )
        argv = [sys.executable, "-m", "rapproxy.testing.edge.forwarder"]
        argv += ["--tun", TUN_NAME, "--control", str(self.control_path)]
        if bias_ms is not None:
            argv += ["--bias-ms", str(bias_ms)]
        self._forwarder = await r.spawn(argv, stdout=asyncio.subprocess.PIPE)
        assert self._forwarder.stdout is not None
        try:
            line = await asyncio.wait_for(
                self._forwarder.stdout.readline(), _FORWARDER_START_SECONDS
            )
        except TimeoutError as error:
            raise WanError("forwarder did not report ready") from error
        if not line.startswith(b"ready "):
            raise WanError(f"forwarder failed to start: {line!r} (see its stderr)")
        self.bias_us = float(line.split()[1])

    @property
    def forwarder_pid(self) -> int:
        """The forwarder's pid (`ip netns exec` execs it, so the pid is the process's own)."""
        if self._forwarder is None:
            raise WanError("the forwarder is not running")
        return self._forwarder.pid

    async def attach(
        self,
        site: str,
        namespace: Namespace,
        index: int,
        *,
        prefixes: tuple[str, ...] = (),
        bandwidth_mbit: float | None = None,
    ) -> WanLink:
        """Link `namespace` to the router as site `site` (link number `index`).

        `prefixes` are further networks that live at the site (a node's pod CIDR): the router
        routes them to the site and the delay line counts them as the site's.
        """
        if site in self.links:
            raise WanError(f"site {site!r} is already attached")
        if any(link.index == index for link in self.links.values()):
            raise WanError(f"link index {index} is already used")
        router_ip, site_ip = link_addresses(index)
        router_ifname = f"w{index}"
        await self.router.add_veth_peer(
            namespace, router_ip, site_ip, 24, ifname=router_ifname, peer_ifname=SITE_IFNAME
        )
        link = WanLink(site, index, router_ifname, SITE_IFNAME, router_ip, site_ip, prefixes)
        await self.router.exec(
            ["ip", "rule", "add", "iif", router_ifname, "lookup", str(DELAY_TABLE), "pref", "100"]
        )
        for prefix in prefixes:
            await self.router.add_route(prefix, via=site_ip)
        for supernet in (WAN_SUPERNET, POD_SUPERNET):
            await namespace.add_route(supernet, via=router_ip)
        self.links[site] = link
        self.config = self.config.with_site(Site.of(site, (f"10.10.{index}.0/24", *prefixes)))
        await self._push_config()
        if bandwidth_mbit is not None:
            await self.set_bandwidth(site, namespace, bandwidth_mbit)
        return link

    # -- runtime knobs ----------------------------------------------------------------------

    async def set_delays(self, delays: DelayMatrix) -> None:
        """Replace all one-way delays; applies to the next packet the forwarder reads."""
        self.config = self.config.with_delays(delays)
        await self._push_config()

    async def set_bandwidth(self, site: str, namespace: Namespace, mbit: float | None) -> None:
        """Shape both directions of `site`'s link to `mbit` Mbit/s with tbf, or lift it (None)."""
        link = self.links[site]
        for owner, ifname in ((self.router, link.router_ifname), (namespace, link.site_ifname)):
            if mbit is None:
                await owner.exec(["tc", "qdisc", "del", "dev", ifname, "root"], check=False)
                continue
            rate_bytes = mbit * 1e6 / 8
            burst = max(16 * 1024, int(rate_bytes / 250))  # ≥ one 4 ms tick of data at rate
            await owner.exec(
                [
                    *("tc", "qdisc", "replace", "dev", ifname, "root", "tbf"),
                    *("rate", f"{mbit}mbit", "burst", str(burst), "latency", "50ms"),
                ]
            )
        if mbit is None:
            self.bandwidth_mbit.pop(site, None)
        else:
            self.bandwidth_mbit[site] = mbit

    async def stats(self) -> dict[str, Any]:
        """The forwarder's counters: packets, drops, its bias and hold error (µs; `DelayLine.stats`)."""
        answer = await self._control({"op": "stats"})
        stats: dict[str, Any] = answer["stats"]
        return stats

    async def _push_config(self) -> None:
        await self._control({"op": "config", "config": self.config.to_json()})

    async def _control(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(self.control_path)), _CONTROL_SECONDS
            )
        except (OSError, TimeoutError) as error:
            raise WanError(f"forwarder control {self.control_path}: {error}") from error
        try:
            writer.write((json.dumps(request) + "\n").encode())
            raw = await asyncio.wait_for(reader.readline(), _CONTROL_SECONDS)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        answer: dict[str, Any] = json.loads(raw or b"{}")
        if not answer.get("ok"):
            raise WanError(f"forwarder refused {request.get('op')}: {answer.get('error')}")
        return answer

    # -- teardown ---------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop the forwarder and remove the router (its veths vanish from the sites too)."""
        await self.router.aclose()
        with contextlib.suppress(FileNotFoundError):
            self.control_path.unlink()
