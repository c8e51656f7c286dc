"""The Proxier's sync, without iptables or sockets: what a periodic full resync costs in memory."""

from __future__ import annotations

from typing import Any

import pytest

from rapproxy.config import RapproxyConfiguration
from rapproxy.model.service import L4Protocol, ServicePortName
from rapproxy.model.table import ServiceTable
from rapproxy.sync.proxier import Proxier


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
