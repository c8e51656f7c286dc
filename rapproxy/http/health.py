"""Health verdicts with kube-proxy's semantics, kept pure so they can be tested without a server.

kube-proxy's `/healthz` answers 503 when an update has been queued for longer than twice the sync
period without being applied (the proxy is stuck), or when the node is being deleted (so load
balancers drain it). `/livez` is the same minus the node check: a draining node is not dead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class HealthState:
    sync_period: float
    last_applied: float | None = None  # wall-clock time of the last successful sync
    oldest_pending: float | None = None  # wall-clock time of the oldest unapplied change
    node_deleting: bool = False

    def stale(self, now: float) -> bool:
        if self.oldest_pending is None:
            return False
        return now - self.oldest_pending > 2 * self.sync_period

    def verdict(self, now: float, *, check_node: bool) -> tuple[int, dict[str, Any]]:
        healthy = not self.stale(now) and self.last_applied is not None
        eligible = not self.node_deleting
        ok = healthy and (eligible or not check_node)
        body = {
            "lastUpdated": self.last_applied,
            "currentTime": now,
            "oldestPendingChange": self.oldest_pending,
            "nodeEligible": eligible,
            "healthy": healthy,
        }
        return (200 if ok else 503), body
