"""The open-loop UDP load: reply matching, and real runs against echoes on loopback.

A loss count is only worth something if the same code counts losses when they happen, so one
echo answers every datagram and another drops every third.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from rapproxy.testing.backend import UdpEcho
from rapproxy.testing.udpload import (
    ANSWERED,
    LOST,
    InvalidUdpLoadSpec,
    UdpLoadSpec,
    outcomes,
    parse_reply,
    payload,
    run_udp_load,
)


def test_a_reply_names_its_request_and_the_backend_that_overwrote_the_pad() -> None:
    reply = b"b1:" + payload(42)[3:]
    assert parse_reply(reply) == (42, "b1")
    assert parse_reply(payload(7)) == (7, "")  # an untouched echo
    assert parse_reply(b"garbage") is None
    assert parse_reply(b"x#notanumber") is None


def test_a_reply_later_than_the_timeout_counts_as_lost() -> None:
    sent = [(0, 100.0, 10.0, 0), (1, 100.1, 10.1, 1), (2, 100.2, 10.2, 0)]
    replies = {0: (10.05, "b1"), 1: (11.5, "b2")}
    result = outcomes(sent, replies, reply_timeout=1.0)
    assert [(d.outcome, d.backend) for d in result] == [(ANSWERED, "b1"), (LOST, ""), (LOST, "")]
    assert result[0].seconds == pytest.approx(0.05)


@pytest.mark.parametrize("field", [{"port": 0}, {"rate": 0}, {"flows": 0}, {"seconds": 2e6}])
def test_an_impossible_spec_is_refused(field: dict[str, float]) -> None:
    values: dict[str, object] = {"host": "127.0.0.1", "port": 9, "rate": 1.0, "seconds": 1.0}
    with pytest.raises(InvalidUdpLoadSpec):
        UdpLoadSpec(**{**values, **field})  # type: ignore[arg-type]


class _DropsEveryThird(UdpEcho):
    def __init__(self) -> None:
        super().__init__("d3")
        self.seen = 0

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.seen += 1
        if self.seen % 3:
            super().datagram_received(data, addr)


@pytest.fixture
async def echoes() -> AsyncIterator[tuple[int, int]]:
    loop = asyncio.get_running_loop()
    whole, _ = await loop.create_datagram_endpoint(
        lambda: UdpEcho("b1"), local_addr=("127.0.0.1", 0)
    )
    lossy, _ = await loop.create_datagram_endpoint(_DropsEveryThird, local_addr=("127.0.0.1", 0))
    try:
        yield whole.get_extra_info("sockname")[1], lossy.get_extra_info("sockname")[1]
    finally:
        whole.close()
        lossy.close()


async def test_every_datagram_to_a_whole_echo_is_answered(echoes: tuple[int, int]) -> None:
    spec = UdpLoadSpec("127.0.0.1", echoes[0], rate=400, seconds=0.5, reply_timeout=0.5)
    report = await run_udp_load(spec)
    assert report.counts() == {ANSWERED: 200}
    assert report.summary()["by_backend"] == {"b1": 200}
    assert {d.flow for d in report.datagrams} == set(range(spec.flows))


async def test_datagrams_an_echo_drops_are_counted_lost(echoes: tuple[int, int]) -> None:
    spec = UdpLoadSpec("127.0.0.1", echoes[1], rate=300, seconds=0.5, reply_timeout=0.3)
    report = await run_udp_load(spec)
    assert report.counts() == {ANSWERED: 100, LOST: 50}
