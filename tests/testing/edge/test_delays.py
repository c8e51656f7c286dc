"""The WAN's model: sites, one-way delays, and the forwarder's per-packet lookup."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rapproxy.testing.edge.delays import (
    DelayLookup,
    DelayMatrix,
    InvalidWanConfig,
    Site,
    WanConfig,
)

SITES = (
    Site.of("node-1", ["10.10.1.0/24", "10.244.1.0/24"]),
    Site.of("node-2", ["10.10.2.0/24", "10.244.2.0/24"]),
    Site.of("client-1", ["10.10.101.0/24"]),
)


def header_addresses(source: str, destination: str) -> bytes:
    return ipaddress.IPv4Address(source).packed + ipaddress.IPv4Address(destination).packed


def test_symmetric_delays_hold_in_both_directions() -> None:
    matrix = DelayMatrix.symmetric({("node-1", "node-2"): 5.0})
    assert matrix.delay_ms("node-1", "node-2") == 5.0
    assert matrix.delay_ms("node-2", "node-1") == 5.0
    assert matrix.delay_ms("node-1", "client-1") == 0.0


def test_a_site_has_no_delay_to_itself() -> None:
    with pytest.raises(InvalidWanConfig, match=r"delays\.node-1\.node-1"):
        DelayMatrix({("node-1", "node-1"): 1.0})


def test_negative_delays_are_refused_naming_the_pair() -> None:
    with pytest.raises(InvalidWanConfig, match=r"delays\.node-1\.node-2"):
        DelayMatrix({("node-1", "node-2"): -1.0})


def test_overlapping_site_prefixes_are_refused() -> None:
    with pytest.raises(InvalidWanConfig, match="overlaps"):
        WanConfig((SITES[0], Site.of("other", ["10.244.1.128/25"])))


def test_delays_naming_an_unknown_site_are_refused() -> None:
    with pytest.raises(InvalidWanConfig, match="no site 'node-9'"):
        WanConfig(SITES, DelayMatrix({("node-1", "node-9"): 1.0}))


def test_the_lookup_finds_the_pair_by_link_and_pod_addresses() -> None:
    config = WanConfig(SITES, DelayMatrix({("node-1", "node-2"): 5.0}))
    lookup = DelayLookup(config)
    assert lookup.seconds(header_addresses("10.10.1.2", "10.244.2.7")) == pytest.approx(0.005)
    assert lookup.seconds(header_addresses("10.244.1.3", "10.10.2.2")) == pytest.approx(0.005)
    assert lookup.seconds(header_addresses("10.10.2.2", "10.10.1.2")) == 0.0  # one-way only


def test_unknown_addresses_and_undelayed_pairs_pass_straight_through() -> None:
    lookup = DelayLookup(WanConfig(SITES, DelayMatrix({("node-1", "node-2"): 5.0})))
    assert lookup.seconds(header_addresses("10.10.1.2", "192.0.2.1")) == 0.0
    assert lookup.seconds(header_addresses("10.10.101.2", "10.10.1.2")) == 0.0


def test_the_config_round_trips_through_json() -> None:
    config = WanConfig(SITES, DelayMatrix.symmetric({("node-1", "client-1"): 2.5}))
    assert WanConfig.from_json(config.to_json()) == config


@pytest.mark.parametrize(
    ("document", "field"),
    [
        ({"sites": {"a": "10.0.0.0/24"}}, "sites.a"),
        ({"sites": {"a": ["10.0.0.1/24"]}}, "sites.a"),
        ({"sites": {"a": ["fd00::/64"]}}, "sites.a"),
        ({"delays_ms": {"a": {"b": "fast"}}}, "delays_ms.a.b"),
    ],
)
def test_malformed_documents_name_the_field(document: object, field: str) -> None:
    with pytest.raises(InvalidWanConfig, match=field.replace(".", r"\.")):
        WanConfig.from_json(document)


@given(
    st.dictionaries(
        st.tuples(st.sampled_from(["a", "b", "c"]), st.sampled_from(["a", "b", "c"])).filter(
            lambda pair: pair[0] != pair[1]
        ),
        st.floats(min_value=0, max_value=1000),
    ),
    st.floats(min_value=0.1, max_value=10),
)
def test_scaling_scales_every_pair(pairs: dict[tuple[str, str], float], factor: float) -> None:
    scaled = DelayMatrix(pairs).scaled(factor)
    for (a, b), value in pairs.items():
        assert scaled.delay_ms(a, b) == pytest.approx(value * factor)
