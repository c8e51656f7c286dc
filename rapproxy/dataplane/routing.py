"""The seam between the data plane and whoever decides where traffic goes.

The relays never see Services, EndpointSlices or balancing policies. On each new TCP connection
(and each new UDP client flow) they ask a `BackendSelector` two questions — which service does this
intercepted destination belong to, and which backend should be dialled next — and report back what
happened (dial failures, connection open/close). Keeping the seam this narrow lets the relays be
tested with a ten-line selector on loopback, and lets the balancer evolve without touching I/O.

All methods are called on the event loop thread, on the connection path: implementations must be
O(1)-ish and must not do I/O. They should not raise; if they do, the relay logs the error and
closes that one client instead of letting the exception reach the loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

L4Protocol = Literal["TCP", "UDP"]
"""The L4 protocol of an intercepted flow, spelled as in a Kubernetes ServicePort."""


@dataclass(frozen=True, slots=True)
class Backend:
    """One dialable endpoint: an IP literal (v4 or v6) and a port."""

    ip: str
    port: int


class BackendSelector(Protocol):
    """Asked on every new TCP connection / new UDP client flow. Must be O(1)-ish, no I/O."""

    def service_for(self, protocol: L4Protocol, dst_ip: str, dst_port: int) -> str | None:
        """The service key for an intercepted original destination; None: not ours, close it."""
        ...

    def choose(self, service: str, client_ip: str, tried: frozenset[Backend]) -> Backend | None:
        """The next backend to dial, excluding those already tried for this connection.

        None means give up: no (more) usable backend for this client.
        """
        ...

    def dial_failed(self, service: str, backend: Backend, client_ip: str) -> None:
        """A dial to `backend` failed (refused, unreachable, timed out).

        Feeds passive outlier detection and resets the client's session affinity.
        """
        ...

    def connection_opened(
        self, service: str, backend: Backend, connect_seconds: float | None = None
    ) -> int | None:
        """A relay to `backend` is established (active-connection accounting).

        It counts as open, and as a request in flight until answered (`first_response`,
        `response_started`) or closed. `connect_seconds`: how long the dial took (TCP; None
        where nothing was dialled). Returns the requests in flight to `backend` with this one
        (the queue it joins), where the selector counts them; the relay hands it back with
        `first_response`.
        """
        ...

    def first_response(
        self,
        service: str,
        backend: Backend,
        connect_seconds: float,
        response_seconds: float,
        queued: int | None = None,
    ) -> None:
        """The first byte from `backend` came `response_seconds` after the request's first byte
        went to it (TCP, once per connection): the balancer's latency signal. The connection's
        request is answered. `queued`: what `connection_opened` returned for it."""
        ...

    def response_started(self, service: str, backend: Backend) -> None:
        """A response began that is not timed (TCP: a later request on the connection, or a
        server that spoke first): the connection's request is answered."""
        ...

    def request_started(self, service: str, backend: Backend) -> None:
        """An answered TCP connection sent more (keep-alive's next request): in flight again."""
        ...

    def connection_closed(self, service: str, backend: Backend, awaiting: bool = True) -> None:
        """A relay previously reported by `connection_opened` has ended.

        `awaiting`: its last request was still unanswered (always so for UDP flows).
        """
        ...
