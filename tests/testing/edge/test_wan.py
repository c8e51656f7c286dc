"""The emulated WAN: the delay it adds, runtime changes, tbf shaping, and no way out."""

from __future__ import annotations

import statistics
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from rapproxy.testing.edge.delays import DelayMatrix
from rapproxy.testing.edge.measure import download_seconds, icmp_rtts, wait_port
from rapproxy.testing.edge.wan import Wan
from rapproxy.testing.netns import Namespace

pytestmark = pytest.mark.root


@dataclass
class TwoSites:
    wan: Wan
    a: Namespace
    b: Namespace


@pytest.fixture
async def sites(tmp_path: Path) -> AsyncIterator[TwoSites]:
    wan = await Wan.create(tmp_path)
    created = [wan.router]
    try:
        a = await Namespace.create("site-a")
        created.append(a)
        b = await Namespace.create("site-b")
        created.append(b)
        await wan.attach("a", a, 1, prefixes=("10.244.1.0/24",))
        await wan.attach("b", b, 2)
        yield TwoSites(wan, a, b)
    finally:
        for namespace in reversed(created):
            await namespace.aclose()


async def median_rtt_ms(sites: TwoSites, count: int = 15) -> float:
    rtts = await sites.a.call(icmp_rtts, "10.10.2.2", count, 0.005)
    assert len(rtts) == count
    return statistics.median(rtts) * 1000


@pytest.mark.parametrize("one_way_ms", [5.0, 20.0])
async def test_ping_gains_twice_the_one_way_delay_within_ten_percent(
    sites: TwoSites, one_way_ms: float
) -> None:
    base = await median_rtt_ms(sites)
    assert base < 1.0
    await sites.wan.set_delays(DelayMatrix.symmetric({("a", "b"): one_way_ms}))
    added = await median_rtt_ms(sites) - base
    assert added == pytest.approx(2 * one_way_ms, rel=0.10)


async def test_a_delay_change_applies_while_running_and_one_way_delays_add_up(
    sites: TwoSites,
) -> None:
    base = await median_rtt_ms(sites)
    await sites.wan.set_delays(DelayMatrix({("a", "b"): 4.0}))
    assert await median_rtt_ms(sites) - base == pytest.approx(4.0, rel=0.10)
    await sites.wan.set_delays(DelayMatrix({("a", "b"): 4.0, ("b", "a"): 12.0}))
    assert await median_rtt_ms(sites) - base == pytest.approx(16.0, rel=0.10)
    await sites.wan.set_delays(DelayMatrix())
    assert await median_rtt_ms(sites) < 1.0


async def test_tbf_caps_a_download_at_the_link_rate(sites: TwoSites) -> None:
    size = 1_000_000
    backend = [sys.executable, "-m", "rapproxy.testing.backend", "--name", "b"]
    await sites.b.spawn([*backend, "--http", "10.10.2.2:8080", "--size", str(size)])
    await sites.a.call(wait_port, "10.10.2.2", 8080, 15.0)
    fast = await sites.a.call(download_seconds, "http://10.10.2.2:8080/", size)
    await sites.wan.set_bandwidth("a", sites.a, 16.0)
    shaped = await sites.a.call(download_seconds, "http://10.10.2.2:8080/", size)
    mbit = size * 8 / shaped / 1e6
    assert 10.0 < mbit <= 16.0 * 1.1
    assert size * 8 / fast / 1e6 > 50.0


async def test_no_namespace_of_the_wan_has_a_default_route_in_any_table(
    sites: TwoSites,
) -> None:
    for namespace in (sites.wan.router, sites.a, sites.b):
        routes = (await namespace.exec(["ip", "-4", "route", "show", "table", "all"])).stdout
        assert not [line for line in routes.splitlines() if line.startswith("default")], routes
    rules = (await sites.wan.router.exec(["ip", "rule"])).stdout
    assert "iif w1 lookup 100" in rules


async def test_addresses_outside_the_closed_world_find_no_route(sites: TwoSites) -> None:
    result = await sites.a.exec(["ip", "route", "get", "192.0.2.1"], check=False)
    assert result.returncode != 0
    assert "unreachable" in result.stderr
