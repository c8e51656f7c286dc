"""IP address text: the fast path agrees with `ipaddress` on everything it is given."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from rapproxy.model.addresses import ip_sort_key, parse_ip


def ipaddress_says(text: str) -> tuple[int, str, bytes] | None:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    return ip.version, str(ip), ip.packed


def fast_says(text: str) -> tuple[int, str, bytes] | None:
    try:
        family, canonical = parse_ip(text)
        key_family, packed = ip_sort_key(text)
    except ValueError:
        return None
    assert key_family == family
    return family, canonical, packed


octet = st.integers(0, 255)
# Near-misses of dotted-quad text: leading zeros, signs, spaces, too many or too few parts.
octet_text = st.one_of(
    octet.map(str),
    octet.map(lambda n: f"0{n}"),
    octet.map(lambda n: f"+{n}"),
    octet.map(lambda n: f" {n}"),
    st.integers(256, 99999).map(str),
    st.just(""),
)
dotted = st.lists(octet_text, min_size=2, max_size=5).map(".".join)
addresses = st.one_of(
    st.ip_addresses().map(str),
    st.ip_addresses(v=6).map(lambda ip: ip.exploded),
    st.ip_addresses(v=6).map(lambda ip: str(ip).upper()),
    dotted,
    st.text(alphabet="0123456789.:abcdefABCDEF%x \x00", max_size=45),
    st.text(max_size=20),
)


@given(addresses)
@example("10.96.0.1")
@example("0.0.0.0")
@example("255.255.255.255")
@example("010.96.0.1")
@example("10.96.0.1 ")
@example("10.96.0.1\x00")
@example("\udc80")
@example("::ffff:10.96.0.1")
@example("fd00::0001")
@example("fe80::1%eth0")
def test_parse_ip_accepts_refuses_and_normalizes_exactly_as_ipaddress(text: str) -> None:
    assert fast_says(text) == ipaddress_says(text)


def test_canonical_ipv4_text_comes_back_as_the_same_object() -> None:
    # No new string per address: 50k endpoints share the text they were parsed from.
    text = "".join(["10.244.", "0.7"])
    assert parse_ip(text)[1] is text


@pytest.mark.parametrize("value", [5, 3232235777, b"10.0.0.1", None, 1.5])
def test_only_text_is_an_address(value: object) -> None:
    # ipaddress.ip_address(5) is 0.0.0.5; the API only ever sends text.
    with pytest.raises(ValueError):
        parse_ip(value)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ip_sort_key(value)  # type: ignore[arg-type]


def test_sort_key_orders_numerically_ipv4_before_ipv6() -> None:
    texts = ["fd00::1", "10.0.0.10", "10.0.0.9", "9.255.255.255", "::1"]
    assert sorted(texts, key=ip_sort_key) == [
        "9.255.255.255",
        "10.0.0.9",
        "10.0.0.10",
        "::1",
        "fd00::1",
    ]
