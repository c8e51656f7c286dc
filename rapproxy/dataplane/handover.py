"""Handover of listening sockets from a running rapproxy to the instance replacing it.

Why pass sockets instead of binding a second one with SO_REUSEPORT: a rolling update starts the new
pod beside the old one (DaemonSet `maxSurge: 1`). With two SO_REUSEPORT listeners the kernel spreads
new connections over both, and when the old process closes its listener every connection waiting
in *its* accept queue (handshake complete, not yet accepted) is reset; only
`net.ipv4.tcp_migrate_req`, off by default, would move them. So, as HAProxy's seamless reload
does (`expose-fd listeners` and `-x`), the running instance passes the listening sockets
themselves over a unix socket with SCM_RIGHTS. Both processes then accept from one accept queue;
when the old one stops accepting and closes its descriptor, the socket lives on in the new one and
nothing queued is lost. SO_REUSEPORT stays set on the listeners as the fallback when there is no
one to take over from (a predecessor that crashed mid-handover): then a fresh bind still works.

Protocol (version 1), one exchange per connection over a SOCK_SEQPACKET unix socket (records keep
their boundaries, so a header is never read in pieces), abstract by default (scoped to the network
namespace, which for the DaemonSet is the host's: no hostPath needed):

1. the successor connects;
2. the running instance checks that the peer runs as its own uid (SO_PEERCRED): anyone who gets
   these sockets receives the node's Service traffic;
3. it sends records, each a JSON header `{"version": 1, "sockets": ["tcp 0.0.0.0:15001", ...],
   "more": false}` carrying those descriptors, in that order, as SCM_RIGHTS ancillary data; at
   most `PER_MESSAGE` per record (the kernel takes 253), `more` on all but the last — a node with
   hundreds of UDP Services has a socket for each;
4. it closes its own handover listener, then the connection. The successor reads until EOF, so
   when it binds the handover address for the next update, the predecessor has released it.

A running instance hands over once: afterwards it has a successor and is about to drain. The header
is a pure function pair (`encode_offer`, `decode_offer`); the I/O shells are `HandoverServer` (the
running instance) and `take_over` (the successor). A predecessor that sends garbage, or nothing in
time, is logged and ignored: the successor binds fresh sockets rather than failing to start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
import struct
from collections.abc import Callable, Mapping, Sequence

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
PER_MESSAGE = 128
"""Descriptors per record: below the kernel's SCM_MAX_FD (253), and a header of a few KiB."""
MAX_SOCKETS = 8192
"""Far more than a node proxy holds (a TCP listener per family, two HTTP, one per UDP port)."""
_MAX_HEADER = 64 * 1024
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

Offer = Callable[[], Mapping[str, int]]
"""Returns the descriptors of the listening sockets to pass, by name, when a successor asks."""


class HandoverError(RuntimeError):
    """A handover message that cannot be used; the message says what was wrong with it."""


def listener_name(kind: str, host: str, port: int) -> str:
    """The name both instances use for one listener: `tcp 0.0.0.0:15001`, `healthz [::]:10256`.

    A successor adopts a socket only under the name it would bind itself, so a changed setting
    (another port, another address) means a fresh socket, never a wrong one.
    """
    shown = f"[{host}]" if ":" in host else host
    return f"{kind} {shown}:{port}"


def encode_offer(names: Sequence[str]) -> list[tuple[bytes, list[str]]]:
    """The records to send: each header with the names whose descriptors go with it, in order."""
    if len(names) > MAX_SOCKETS:
        raise HandoverError(f"{len(names)} sockets to pass; at most {MAX_SOCKETS}")
    if len(set(names)) != len(names):
        raise HandoverError(f"duplicate socket names in {list(names)!r}")
    batches = [list(names[i : i + PER_MESSAGE]) for i in range(0, len(names), PER_MESSAGE)]
    batches = batches or [[]]
    return [
        (
            json.dumps(
                {"version": PROTOCOL_VERSION, "sockets": batch, "more": i < len(batches) - 1}
            ).encode(),
            batch,
        )
        for i, batch in enumerate(batches)
    ]


def decode_offer(header: bytes, descriptors: int) -> tuple[list[str], bool]:
    """The socket names of a received header, and whether more records follow.

    `descriptors` is how many descriptors arrived with the header.
    """
    try:
        message = json.loads(header)
    except ValueError as error:
        raise HandoverError(f"header is not JSON: {error}") from None
    if not isinstance(message, dict):
        raise HandoverError(f"header must be a JSON object, got {type(message).__name__}")
    version = message.get("version")
    if version != PROTOCOL_VERSION:
        raise HandoverError(f"version: {version!r} is not the supported {PROTOCOL_VERSION}")
    names = message.get("sockets")
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise HandoverError(f"sockets: must be a list of non-empty names, got {names!r}")
    if len(set(names)) != len(names):
        raise HandoverError(f"sockets: duplicate names in {names!r}")
    if len(names) != descriptors:
        raise HandoverError(f"sockets: {len(names)} names but {descriptors} descriptors arrived")
    more = message.get("more", False)
    if not isinstance(more, bool):
        raise HandoverError(f"more: must be true or false, got {more!r}")
    return names, more


def unix_address(address: str) -> str:
    """The address `socket.bind` takes: '@name' is abstract (a leading NUL), else a path."""
    return "\0" + address[1:] if address.startswith("@") else address


def take_over(address: str, timeout: float = 5.0) -> dict[str, socket.socket]:
    """Ask the instance serving `address` for its listening sockets; {} when nobody serves it.

    Blocking, with `timeout` on every step: it runs once, at startup, before this process serves
    anything. Whatever goes wrong after connecting is logged and yields {}; descriptors received
    with a bad header are closed, never leaked.
    """
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn.settimeout(timeout)
    try:
        try:
            conn.connect(unix_address(address))
        except (FileNotFoundError, ConnectionRefusedError):
            return {}  # nobody to take over from: the first instance on this node
        except OSError as error:
            log.warning("handover: cannot reach %s (%s); binding fresh sockets", address, error)
            return {}
        owned: list[socket.socket] = []  # every descriptor received, closed if anything fails
        received: dict[str, socket.socket] = {}
        try:
            more = True
            while more:
                header, fds, flags, _addr = socket.recv_fds(conn, _MAX_HEADER, PER_MESSAGE)
                sockets = [socket.socket(fileno=fd) for fd in fds]
                owned.extend(sockets)
                if not header:
                    raise HandoverError("the predecessor closed the connection mid-offer")
                if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
                    raise HandoverError("a record did not fit the receive buffers")
                names, more = decode_offer(header, len(sockets))
                for name, sock in zip(names, sockets, strict=True):
                    if name in received:
                        raise HandoverError(f"sockets: {name!r} offered twice")
                    received[name] = sock
            if conn.recv(1):
                raise HandoverError("data after the last record")
        except (HandoverError, OSError) as error:
            for sock in owned:
                sock.close()
            log.warning("handover from %s failed (%s); binding fresh sockets", address, error)
            return {}
        return received
    finally:
        conn.close()


class HandoverServer:
    """Owns the handover listener of the running instance; hands its sockets over once.

    `start()` binds `address` (a stale socket file left by a crash is replaced; an abstract
    address in use is reported, and handover is then off for this instance); `handed_over` is set
    once a successor took the sockets. `aclose()` stops serving. A failed exchange (wrong uid,
    peer gone) is logged, and the next successor may try again.
    """

    def __init__(self, address: str, offer: Offer, *, send_timeout: float = 5.0) -> None:
        self.address = address
        self.offer = offer
        self.send_timeout = send_timeout
        self.handed_over = asyncio.Event()
        self._listener: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def serving(self) -> bool:
        return self._listener is not None

    async def start(self) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            if not self.address.startswith("@"):
                _remove_stale_socket_file(self.address)
            listener.bind(unix_address(self.address))
            if not self.address.startswith("@"):
                os.chmod(self.address, 0o600)
            listener.listen(4)
            listener.setblocking(False)
        except OSError as error:
            listener.close()
            log.warning(
                "handover: cannot serve %s (%s); the next instance will bind fresh sockets",
                self.address,
                error,
            )
            return
        self._listener = listener
        self._task = asyncio.get_running_loop().create_task(self._serve(), name="handover")

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while self._listener is not None:
            conn, _ = await loop.sock_accept(self._listener)
            with conn:
                try:
                    if self._hand_over(conn):
                        return
                except Exception:
                    log.exception("handover to a successor failed; still serving")

    def _hand_over(self, conn: socket.socket) -> bool:
        pid, uid, _gid = _PEERCRED.unpack(
            conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        )
        if uid != os.geteuid():
            log.warning(
                "handover: refused pid %d running as uid %d, not %d", pid, uid, os.geteuid()
            )
            return False
        offered = dict(self.offer())
        names = list(offered)
        conn.setblocking(True)
        conn.settimeout(self.send_timeout)
        # A few small records; blocking with a timeout on a fresh unix socket cannot stall the
        # loop for longer than that, and it happens once per process lifetime.
        for header, batch in encode_offer(names):
            socket.send_fds(conn, [header], [offered[n] for n in batch])
        self._close_listener()  # before the connection: the successor binds the address on EOF
        self.handed_over.set()
        log.info("handed %d listening socket(s) over to pid %d: %s", len(names), pid, names)
        return True

    def _close_listener(self) -> None:
        listener, self._listener = self._listener, None
        if listener is None:
            return
        if not self.address.startswith("@"):
            # Still ours: a successor binds the address only after we closed the connection,
            # which happens after this.
            with contextlib.suppress(OSError):
                os.unlink(self.address)
        listener.close()

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._close_listener()


def _remove_stale_socket_file(path: str) -> None:
    """A socket file nobody accepts on (left by a crash) would make bind fail with EADDRINUSE."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(f"{path} exists and is not a socket")
    os.unlink(path)
