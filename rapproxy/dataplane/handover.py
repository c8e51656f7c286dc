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

Protocol (version 1), one exchange per connection, on an abstract unix socket by default (scoped
to the network namespace, which for the DaemonSet is the host's: no hostPath needed):

1. the successor connects;
2. the running instance checks that the peer runs as its own uid (SO_PEERCRED): anyone who gets
   these sockets receives the node's Service traffic;
3. it sends one message, a JSON header `{"version": 1, "sockets": ["tcp 0.0.0.0:15001", ...]}`
   carrying the descriptors, in that order, as SCM_RIGHTS ancillary data;
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
MAX_SOCKETS = 64
"""More than a node proxy ever listens on (TCP per family, two HTTP servers); SCM_MAX_FD is 253."""
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


def encode_offer(names: Sequence[str]) -> bytes:
    """The header sent with the descriptors, in the same order as `names`."""
    if len(names) > MAX_SOCKETS:
        raise HandoverError(f"{len(names)} sockets to pass; at most {MAX_SOCKETS} fit one message")
    if len(set(names)) != len(names):
        raise HandoverError(f"duplicate socket names in {list(names)!r}")
    return json.dumps({"version": PROTOCOL_VERSION, "sockets": list(names)}).encode()


def decode_offer(header: bytes, descriptors: int) -> list[str]:
    """The socket names of a received header; `descriptors` is how many arrived with it."""
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
    return names


def unix_address(address: str) -> str:
    """The address `socket.bind` takes: '@name' is abstract (a leading NUL), else a path."""
    return "\0" + address[1:] if address.startswith("@") else address


def take_over(address: str, timeout: float = 5.0) -> dict[str, socket.socket]:
    """Ask the instance serving `address` for its listening sockets; {} when nobody serves it.

    Blocking, with `timeout` on every step: it runs once, at startup, before this process serves
    anything. Whatever goes wrong after connecting is logged and yields {}; descriptors received
    with a bad header are closed, never leaked.
    """
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(timeout)
    try:
        try:
            conn.connect(unix_address(address))
        except (FileNotFoundError, ConnectionRefusedError):
            return {}  # nobody to take over from: the first instance on this node
        except OSError as error:
            log.warning("handover: cannot reach %s (%s); binding fresh sockets", address, error)
            return {}
        try:
            header, fds, flags, _addr = socket.recv_fds(conn, _MAX_HEADER, MAX_SOCKETS)
        except OSError as error:
            log.warning("handover: no answer from %s (%s); binding fresh sockets", address, error)
            return {}
        sockets = [socket.socket(fileno=fd) for fd in fds]
        try:
            if flags & socket.MSG_CTRUNC:
                raise HandoverError("more descriptors than fit the control buffer")
            names = decode_offer(header, len(sockets))
            _read_until_eof(conn)
        except (HandoverError, OSError) as error:
            for sock in sockets:
                sock.close()
            log.warning("handover from %s failed (%s); binding fresh sockets", address, error)
            return {}
        return dict(zip(names, sockets, strict=True))
    finally:
        conn.close()


def _read_until_eof(conn: socket.socket) -> None:
    """The predecessor closes the connection only after releasing the handover address."""
    while conn.recv(4096):
        pass


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
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
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
        # One small message; blocking with a timeout on a fresh unix socket cannot stall the loop
        # for longer than that, and it happens once per process lifetime.
        socket.send_fds(conn, [encode_offer(names)], [offered[n] for n in names])
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
