"""Passive outlier detection: skip endpoints that keep refusing connections.

The relay reports every failed dial. After `consecutive_failures` failures in a row an endpoint is
ejected for `base_ejection_seconds` times the number of times it has been ejected (capped), as
Envoy does; a successful connection resets the streak. Ejection never empties a service: when
every candidate is ejected they are all used anyway ("panic mode"), because a maybe-bad endpoint
beats a certain failure.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass

from rapproxy.model.endpoints import Endpoint

EndpointKey = tuple[str, int]


@dataclass(frozen=True, slots=True)
class OutlierSettings:
    consecutive_failures: int = 3
    base_ejection_seconds: float = 10.0
    max_ejection_seconds: float = 300.0


@dataclass(slots=True)
class _Health:
    failures: int = 0
    ejections: int = 0
    ejected_until: float = 0.0


class OutlierDetector:
    def __init__(self, settings: OutlierSettings | None = None) -> None:
        self.settings = settings or OutlierSettings()
        self._health: dict[EndpointKey, _Health] = {}

    def record_failure(self, endpoint: EndpointKey, now: float) -> bool:
        """Count a failed dial; returns True when this failure ejected the endpoint."""
        health = self._health.setdefault(endpoint, _Health())
        health.failures += 1
        if health.failures < self.settings.consecutive_failures or health.ejected_until > now:
            return False
        health.ejections += 1
        health.failures = 0
        duration = min(
            self.settings.base_ejection_seconds * health.ejections,
            self.settings.max_ejection_seconds,
        )
        health.ejected_until = now + duration
        return True

    def record_success(self, endpoint: EndpointKey) -> None:
        health = self._health.get(endpoint)
        if health is not None:
            health.failures = 0
            if health.ejected_until == 0.0:
                del self._health[endpoint]

    def is_ejected(self, endpoint: EndpointKey, now: float) -> bool:
        health = self._health.get(endpoint)
        return health is not None and health.ejected_until > now

    def filter(self, candidates: Sequence[Endpoint], now: float) -> Sequence[Endpoint]:
        if not self._health:
            return candidates
        healthy = [e for e in candidates if not self.is_ejected((e.ip, e.port), now)]
        return healthy or candidates

    def ejected(self, now: float) -> list[EndpointKey]:
        return sorted(k for k, h in self._health.items() if h.ejected_until > now)

    def retain(self, alive: Container[EndpointKey]) -> None:
        """Forget every endpoint not in `alive`: O(endpoints with a record), usually few."""
        for key in [k for k in self._health if k not in alive]:
            del self._health[key]

    def forget(self, endpoints: Iterable[EndpointKey]) -> None:
        for key in endpoints:
            self._health.pop(key, None)
