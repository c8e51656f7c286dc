"""Incremental sync state equals a rebuild from scratch.

The scale work made `ServiceTable.replaced`, `ChangeTracker.take_change` and the Proxier's
derived state (routes, backends, redirect targets) incremental. These tests drive random change
sequences — including service ports that claim the same address — and check that the incremental
result is exactly what a full rebuild of the same entries gives.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from rapproxy.config import RapproxyConfiguration
from rapproxy.model.endpoints import Endpoint
from rapproxy.model.service import L4Protocol, ServicePort, ServicePortName
from rapproxy.model.table import ServiceEntry, ServiceTable
from rapproxy.sync.proxier import Proxier
from rapproxy.sync.tracker import TableChange

NAMES = [ServicePortName("default", f"s{i}", "p", L4Protocol.TCP) for i in range(6)]
IPS = ["10.96.0.1", "10.96.0.2", "10.96.0.3"]  # few, so claims collide


def entry(
    name: ServicePortName, ip: str, external: str | None, node_port: int | None, eps: int
) -> ServiceEntry:
    port = ServicePort(
        name=name,
        port=80,
        target_port=8080,
        cluster_ips=(ip,),
        external_ips=(external,) if external else (),
        node_port=node_port,
    )
    endpoints = tuple(Endpoint(f"10.244.0.{i}", 8080) for i in range(eps))
    return ServiceEntry(port, endpoints)


entries = st.builds(
    entry,
    st.sampled_from(NAMES),
    st.sampled_from(IPS),
    st.one_of(st.none(), st.sampled_from(IPS)),
    st.one_of(st.none(), st.sampled_from([30001, 30002])),
    st.integers(0, 3),
)
steps = st.lists(
    st.tuples(st.lists(st.sampled_from(NAMES), max_size=3), st.lists(entries, max_size=3)),
    max_size=12,
)


def indexes(table: ServiceTable) -> tuple[Any, Any]:
    return dict(table._by_address), dict(table._by_node_port)


@settings(max_examples=300, deadline=None)
@given(steps)
def test_a_derived_table_indexes_exactly_as_a_table_built_whole(steps: Any) -> None:
    table = ServiceTable()
    for removed, added in steps:
        previous_entries = dict(table.entries)
        new = table.replaced(removed, {e.port.name: e for e in added})
        assert dict(table.entries) == previous_entries  # the old snapshot is untouched
        table = new
        assert indexes(table) == indexes(ServiceTable(dict(table.entries)))


def derived_state(proxier: Proxier) -> tuple[Any, ...]:
    return (
        proxier._routes,
        proxier._route_keys,
        proxier._backends,
        +proxier._backend_refs,
        proxier._targets,
        +proxier._port_counts,
    )


@settings(max_examples=150, deadline=None)
@given(steps, st.booleans())
def test_proxier_state_after_incremental_syncs_equals_one_from_scratch(
    steps: Any, skip_one: bool
) -> None:
    """Also when a step is lost (a sync failed half-way): the Proxier then compares tables."""
    config = RapproxyConfiguration()
    incremental = Proxier(config, "node")
    table = ServiceTable()
    for number, (removed, added) in enumerate(steps):
        new = table.replaced(removed, {e.port.name: e for e in added})
        changed = frozenset(removed) | {e.port.name for e in added}
        if not (skip_one and number == 0):
            incremental._derive(
                TableChange(new, table, frozenset(), changed), forget_all_stale_stats=False
            )
        table = new
    incremental._derive(
        TableChange(table, table, frozenset(), frozenset()), forget_all_stale_stats=False
    )
    fresh = Proxier(config, "node")
    fresh._derive(
        TableChange(table, ServiceTable(), frozenset(), frozenset(table.entries)),
        forget_all_stale_stats=False,
    )
    assert derived_state(incremental) == derived_state(fresh)


ENDPOINT_KEYS = [(f"10.244.0.{i}", 8080) for i in range(4)]  # what `entry` gives, shared


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.lists(st.sampled_from(NAMES), max_size=3),
            st.lists(entries, max_size=3),
            st.lists(st.sampled_from(ENDPOINT_KEYS), max_size=2),  # dials that fail first
        ),
        max_size=12,
    )
)
def test_balancer_updated_with_only_the_changed_ports_equals_one_updated_whole(steps: Any) -> None:
    """Services, outlier records included: the incremental update prunes them as it goes."""
    from rapproxy.balancer.balancer import Balancer
    from rapproxy.balancer.categorize import Locality
    from rapproxy.balancer.outlier import OutlierSettings

    ejecting = OutlierSettings(consecutive_failures=1)
    incremental = Balancer(Locality("node"), outliers=ejecting)
    whole = Balancer(Locality("node"), outliers=ejecting)
    table = ServiceTable()
    for removed, added, failures in steps:
        for key in failures:
            for balancer in (incremental, whole):
                balancer.dial_failed(NAMES[0], key, "192.168.0.1", 0.0)
        new = table.replaced(removed, {e.port.name: e for e in added})
        incremental.update(new, frozenset(removed) | {e.port.name for e in added})
        whole.update(new)
        table = new
        assert incremental.describe(0.0) == whole.describe(0.0)
        listed = {(e.ip, e.port) for entry in table.entries.values() for e in entry.endpoints}
        assert set(incremental._endpoint_refs) == listed
        assert incremental._endpoint_refs == whole._endpoint_refs
