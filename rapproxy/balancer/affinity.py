"""ClientIP session affinity with a sliding timeout, as kube-proxy implements it.

A client keeps its endpoint while it keeps connecting within `timeout` seconds of its last
connection. The entry is dropped when the endpoint disappears from the service or a dial to it
fails, so the next connection re-picks (kube-proxy's `affinityReset`).
"""

from __future__ import annotations

from dataclasses import dataclass

EndpointKey = tuple[str, int]


@dataclass(slots=True)
class _Sticky:
    endpoint: EndpointKey
    last_used: float


class AffinityTable:
    def __init__(self, timeout_seconds: float) -> None:
        self.timeout_seconds = timeout_seconds
        self._by_client: dict[str, _Sticky] = {}

    def __len__(self) -> int:
        return len(self._by_client)

    def lookup(self, client_ip: str, now: float) -> EndpointKey | None:
        sticky = self._by_client.get(client_ip)
        if sticky is None:
            return None
        if now - sticky.last_used > self.timeout_seconds:
            del self._by_client[client_ip]
            return None
        return sticky.endpoint

    def remember(self, client_ip: str, endpoint: EndpointKey, now: float) -> None:
        sticky = self._by_client.get(client_ip)
        if sticky is None:
            self._by_client[client_ip] = _Sticky(endpoint, now)
        else:
            sticky.endpoint = endpoint
            sticky.last_used = now

    def forget_client(self, client_ip: str) -> None:
        self._by_client.pop(client_ip, None)

    def retain_endpoints(self, alive: set[EndpointKey]) -> None:
        """Drop every client stuck to an endpoint that is no longer in the service."""
        gone = [client for client, s in self._by_client.items() if s.endpoint not in alive]
        for client in gone:
            del self._by_client[client]

    def expire(self, now: float) -> int:
        """Drop expired entries (kube-proxy's `CleanupStaleStickySessions`); returns how many."""
        stale = [c for c, s in self._by_client.items() if now - s.last_used > self.timeout_seconds]
        for client in stale:
            del self._by_client[client]
        return len(stale)
