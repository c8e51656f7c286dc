"""Polls every peer's `/rap/v1/telemetry` each interval; the round trip is the RTT sample.

One round polls all peers concurrently, each with its own timeout (`poll_timeout`, at most the
interval), so a dead or slow peer costs only its own timeout and never delays the others or the
next round. A success feeds `TelemetryTracker.record_peer` (figures + RTT sample, EWMA in the
tracker); a timeout, connection error, non-200 answer or garbage JSON feeds `record_failure`,
which makes the peer stale at once. A round's results are applied together when the round ends
(at most `poll_timeout` later; ages stay exact because each result keeps its receive time), so a
round makes one new telemetry snapshot, not one per peer: policies re-plan once per round.
Failures are logged when a peer goes bad, then at most once
per `log_interval` while it stays bad, and once when it recovers — a dead node must not flood
the log at one line per second.

RTT is measured over a kept-alive HTTP connection (one per peer), so the sample is a request's
round trip, not a TCP handshake plus one; it also includes the peer's event-loop latency, which
is what a connection forwarded there would see too.

**Scale.** Full-mesh polling is O(N²) requests cluster-wide: N proxies x (N-1) peers per
interval. At 1 s that is ~10k requests/s for 100 nodes, ~100 per node — fine. Beyond about a
hundred nodes pass `scope`: a callback returning the node names worth polling, typically
`RecentTraffic.scope(...)` — only nodes hosting endpoints of services this node forwarded traffic
to recently. Nodes outside the scope are simply not polled; their figures age out and the RAP
policy treats them as unknown (eligible, ranked last), which is correct for a node this proxy
is not sending to anyway.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Collection, Hashable, Iterable
from dataclasses import dataclass

import aiohttp

from rapproxy.model.service import ServicePortName
from rapproxy.model.table import ServiceTable
from rapproxy.model.telemetry import (
    InvalidTelemetry,
    PeerReport,
    TelemetryTracker,
    parse_peer_report,
)
from rapproxy.telemetry.server import TELEMETRY_PATH

log = logging.getLogger(__name__)

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class PeerTarget:
    """Where a peer's telemetry endpoint listens."""

    node_name: str
    address: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}{TELEMETRY_PATH}"


class PeerPoller:
    """Owns one HTTP client session and the polling loop; feeds a `TelemetryTracker`.

    `targets` returns every peer (this node excluded or not: it is skipped by name);
    `token` returns the shared token; `source_address` binds the client socket (peers accept only
    node IPs, so on a multi-address host poll from the node IP).
    """

    def __init__(
        self,
        tracker: TelemetryTracker,
        targets: Callable[[], Iterable[PeerTarget]],
        token: Callable[[], str],
        *,
        source_address: str | None = None,
        scope: Callable[[], Collection[str]] | None = None,
        clock: Clock = time.monotonic,
        log_interval: float = 60.0,
    ) -> None:
        self.tracker = tracker
        self.settings = tracker.settings
        self._targets = targets
        self._token = token
        self._scope = scope
        self._clock = clock
        self._log_interval = log_interval
        self._source_address = source_address
        self._session: aiohttp.ClientSession | None = None
        self._failing_since_log: dict[str, float] = {}
        self.rounds = 0

    async def __aenter__(self) -> PeerPoller:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit_per_host=1,
                local_addr=(self._source_address, 0) if self._source_address else None,
            )
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def poll_set(self) -> list[PeerTarget]:
        targets = [t for t in self._targets() if t.node_name != self.tracker.local_node]
        if self._scope is not None:
            wanted = self._scope()
            targets = [t for t in targets if t.node_name in wanted]
        return targets

    async def poll_once(self) -> None:
        """One round: every peer in the poll set, concurrently; returns when all have answered
        or timed out. Never raises for a peer's failure."""
        targets = self.poll_set()
        self.tracker.retain(t.node_name for t in self._targets())
        if targets:
            results = await asyncio.gather(*(self._poll(t) for t in targets))
            for target, outcome in zip(targets, results, strict=True):
                self._apply(target, outcome)
        self.rounds += 1

    async def run(self) -> None:
        """Poll every `telemetry_interval` until cancelled. Rounds start on a fixed cadence; a
        round cannot overrun it because each poll's timeout is at most the interval."""
        interval = self.settings.telemetry_interval
        next_round = self._clock()
        try:
            while True:
                try:
                    await self.poll_once()
                except Exception:  # a bug in one round must not end telemetry
                    log.exception("telemetry poll round failed")
                next_round += interval
                delay = next_round - self._clock()
                if delay < 0:  # fell behind (suspended process): restart the cadence
                    next_round, delay = self._clock(), 0.0
                await asyncio.sleep(delay)
        finally:
            await self.close()

    async def _poll(self, target: PeerTarget) -> tuple[PeerReport, float] | str:
        """One peer: its report and RTT sample, or the reason it failed. Never raises."""
        session = self._client()
        timeout = aiohttp.ClientTimeout(total=self.settings.poll_timeout)
        headers = {"Authorization": f"Bearer {self._token()}"}
        started = self._clock()
        try:
            async with session.get(target.url, headers=headers, timeout=timeout) as response:
                body = await response.read()
                finished = self._clock()
                if response.status != 200:
                    raise _PollError(f"HTTP {response.status}: {body[:200]!r}")
            report = parse_peer_report(json.loads(body), received_at=finished)
            if report.stats.node_name != target.node_name:
                raise _PollError(f"answered as node {report.stats.node_name!r}")
        except TimeoutError:
            return f"timeout after {self.settings.poll_timeout}s"
        except (aiohttp.ClientError, OSError) as error:
            return f"{type(error).__name__}: {error}"
        except (ValueError, InvalidTelemetry, _PollError) as error:
            # json.JSONDecodeError and UnicodeDecodeError are ValueErrors: garbage from the peer.
            return f"bad answer: {error}"
        return report, finished - started

    def _apply(self, target: PeerTarget, outcome: tuple[PeerReport, float] | str) -> None:
        if isinstance(outcome, str):
            self._failed(target, outcome)
            return
        report, rtt = outcome
        self.tracker.record_peer(target.node_name, report.stats, rtt)
        if self._failing_since_log.pop(target.node_name, None) is not None:
            log.info("telemetry from node %s (%s) recovered", target.node_name, target.url)

    def _failed(self, target: PeerTarget, reason: str) -> None:
        self.tracker.record_failure(target.node_name, reason)
        now = self._clock()
        last = self._failing_since_log.get(target.node_name)
        if last is None or now - last >= self._log_interval:
            self._failing_since_log[target.node_name] = now
            log.warning(
                "telemetry from node %s (%s) failed, marked stale: %s",
                target.node_name,
                target.url,
                reason,
            )


class _PollError(Exception):
    """A peer answered, but not with usable telemetry."""


class RecentTraffic:
    """Which services had traffic lately: the input of the limited poll scope.

    `note` is one dict store per connection (cheap enough for the connection path); `scope`
    turns the recent services into the nodes that host their endpoints.
    """

    def __init__(self, window: float = 60.0) -> None:
        self.window = window
        self._last_seen: dict[Hashable, float] = {}

    def note(self, service: Hashable, now: float) -> None:
        self._last_seen[service] = now

    def recent(self, now: float) -> set[Hashable]:
        expired = [s for s, t in self._last_seen.items() if now - t > self.window]
        for service in expired:
            del self._last_seen[service]
        return set(self._last_seen)

    def scope(
        self, table: Callable[[], ServiceTable], clock: Clock = time.monotonic
    ) -> Callable[[], set[str]]:
        """A `PeerPoller(scope=...)` callback: nodes hosting endpoints of recent services."""

        def nodes() -> set[str]:
            current = table()
            out: set[str] = set()
            for service in self.recent(clock()):
                if not isinstance(service, ServicePortName):
                    continue
                entry = current.get(service)
                if entry is not None:
                    out.update(e.node_name for e in entry.endpoints if e.node_name)
            return out

        return nodes
