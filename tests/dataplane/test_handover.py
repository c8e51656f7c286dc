"""Passing listening sockets to a successor: the header, and the exchange over real sockets.

The property that matters is the last test's: a connection that completed its handshake on the
predecessor's listener, but was never accepted there, is accepted by the successor after the
predecessor closed its descriptor — what SO_REUSEPORT alone would reset.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from rapproxy.dataplane.handover import (
    MAX_SOCKETS,
    PER_MESSAGE,
    HandoverError,
    HandoverServer,
    decode_offer,
    encode_offer,
    listener_name,
    take_over,
    unix_address,
)

# -- the header (pure) -----------------------------------------------------------------------


def test_header_round_trips_names_in_order() -> None:
    names = [listener_name("tcp", "0.0.0.0", 15001), listener_name("healthz", "::", 10256)]
    assert names == ["tcp 0.0.0.0:15001", "healthz [::]:10256"]
    ((header, batch),) = encode_offer(names)
    assert batch == names
    assert decode_offer(header, descriptors=2) == (names, False)


def test_many_sockets_go_in_records_the_kernel_accepts() -> None:
    names = [f"udp default/dns-{i}:53" for i in range(2 * PER_MESSAGE + 1)]
    records = encode_offer(names)
    assert [len(batch) for _header, batch in records] == [PER_MESSAGE, PER_MESSAGE, 1]
    decoded = [decode_offer(header, len(batch)) for header, batch in records]
    assert [more for _names, more in decoded] == [True, True, False]
    assert [name for names, _more in decoded for name in names] == names


@pytest.mark.parametrize(
    ("header", "descriptors", "message"),
    [
        (b"{not json", 0, "not JSON"),
        (b"[1]", 0, "JSON object"),
        (b'{"version": 2, "sockets": []}', 0, "version: 2"),
        (b'{"version": 1, "sockets": "tcp"}', 0, "sockets: must be a list"),
        (b'{"version": 1, "sockets": [""]}', 1, "sockets: must be a list"),
        (b'{"version": 1, "sockets": ["a", "a"]}', 2, "duplicate"),
        (b'{"version": 1, "sockets": ["a", "b"]}', 1, "2 names but 1 descriptors"),
        (b'{"version": 1, "sockets": [], "more": 1}', 0, "more: must be true or false"),
    ],
)
def test_a_bad_header_is_rejected_saying_why(header: bytes, descriptors: int, message: str) -> None:
    with pytest.raises(HandoverError, match=message):
        decode_offer(header, descriptors)


def test_an_offer_too_large_for_one_message_is_refused() -> None:
    with pytest.raises(HandoverError, match="at most"):
        encode_offer([f"udp default/s{i}:53" for i in range(MAX_SOCKETS + 1)])


def test_at_names_are_abstract_addresses_and_paths_stay_paths() -> None:
    assert unix_address("@rapproxy-handover-15001") == "\0rapproxy-handover-15001"
    assert unix_address("/run/rapproxy/handover.sock") == "/run/rapproxy/handover.sock"


# -- the exchange (real unix and TCP sockets) -------------------------------------------------


@pytest.fixture
def address(request: pytest.FixtureRequest) -> str:
    """An abstract address no other test (or xdist worker) uses."""
    return f"@rapproxy-test-handover-{os.getpid()}-{abs(hash(request.node.nodeid))}"


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield sock
    sock.close()


def test_nobody_to_take_over_from_yields_nothing(address: str, tmp_path: Path) -> None:
    assert take_over(address, timeout=1.0) == {}
    assert take_over(str(tmp_path / "absent.sock"), timeout=1.0) == {}


async def test_successor_accepts_a_connection_queued_before_the_predecessor_closed(
    address: str, listener: socket.socket
) -> None:
    port = listener.getsockname()[1]
    name = listener_name("tcp", "127.0.0.1", port)
    server = HandoverServer(address, lambda: {name: listener.fileno()})
    await server.start()
    try:
        taken = await asyncio.to_thread(take_over, address, 5.0)
        assert list(taken) == [name]
        assert server.handed_over.is_set()
        assert not server.serving, "a predecessor hands over once, then frees the address"
        (successor,) = taken.values()
        with successor:
            queued = socket.create_connection(("127.0.0.1", port), timeout=2)
            listener.close()  # the predecessor stops accepting with the connection still queued
            successor.settimeout(2)
            accepted, _peer = successor.accept()
            with queued, accepted:
                queued.sendall(b"still here")
                assert accepted.recv(64) == b"still here"
    finally:
        await server.aclose()


async def test_successor_can_serve_the_address_once_it_has_taken_over(
    address: str, listener: socket.socket
) -> None:
    first = HandoverServer(address, lambda: {"tcp x:1": listener.fileno()})
    await first.start()
    taken = await asyncio.to_thread(take_over, address, 5.0)
    for sock in taken.values():
        sock.close()
    second = HandoverServer(address, lambda: {"tcp x:1": listener.fileno()})
    await second.start()
    try:
        assert second.serving, "the predecessor released the address before the reply ended"
    finally:
        await second.aclose()
        await first.aclose()


async def test_a_socket_file_left_by_a_crash_is_replaced(
    tmp_path: Path, listener: socket.socket
) -> None:
    path = tmp_path / "handover.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody accepts on it
    assert take_over(str(path), timeout=1.0) == {}
    server = HandoverServer(str(path), lambda: {"tcp x:1": listener.fileno()})
    await server.start()
    try:
        assert server.serving
        assert oct(path.stat().st_mode & 0o777) == oct(0o600)
        taken = await asyncio.to_thread(take_over, str(path), 5.0)
        assert list(taken) == ["tcp x:1"]
        for sock in taken.values():
            sock.close()
        assert not path.exists(), "the predecessor removes its file as it hands over"
    finally:
        await server.aclose()


async def test_garbage_from_a_predecessor_is_ignored_and_its_descriptors_closed(
    address: str, listener: socket.socket
) -> None:
    rogue = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    rogue.bind(unix_address(address))
    rogue.listen(1)
    rogue.setblocking(False)
    loop = asyncio.get_running_loop()

    async def answer_garbage() -> None:
        conn, _ = await loop.sock_accept(rogue)
        with conn:
            conn.setblocking(True)
            socket.send_fds(conn, [b'{"version": 99}'], [listener.fileno()])

    before = len(os.listdir("/proc/self/fd"))
    answering = asyncio.create_task(answer_garbage())
    try:
        assert await asyncio.to_thread(take_over, address, 5.0) == {}
        await answering
    finally:
        rogue.close()
    assert len(os.listdir("/proc/self/fd")) == before - 1, "received descriptor closed"


async def test_hundreds_of_sockets_arrive_each_under_its_own_name(address: str) -> None:
    udp = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2 * PER_MESSAGE + 3)]
    try:
        for sock in udp:
            sock.bind(("127.0.0.1", 0))
        by_name = {f"udp default/s{i}:53": sock for i, sock in enumerate(udp)}
        server = HandoverServer(address, lambda: {n: s.fileno() for n, s in by_name.items()})
        await server.start()
        try:
            taken = await asyncio.to_thread(take_over, address, 5.0)
        finally:
            await server.aclose()
        assert list(taken) == list(by_name)
        for name, sock in taken.items():
            with sock:
                assert sock.getsockname() == by_name[name].getsockname()
    finally:
        for sock in udp:
            sock.close()
