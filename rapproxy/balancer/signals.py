"""What the relay measures about each endpoint itself: connect time, and latency against load.

Node telemetry (CPU, memory, a poll's round trip) is at least one poll old and says how busy a
node is, not whether the pods behind a Service keep up: a node at 100 % CPU serving two clients
without a queue and one with a deep queue report the same figure. The relay sees what matters
for the next connection, at no extra cost and with no delay:

* **connect time**, dial start to established: the network round trip to the endpoint's node
  (the peer kernel answers the SYN, however busy the pod is);
* **server time**, from the request's first byte sent upstream to the first response byte,
  less this connection's connect time: what the pod took, its queue included;
* the proxy's own **requests in flight** to the endpoint (kept by the `Balancer`) when the
  request was sent: the queue it joined, itself included.

**Latency against load.** Server times are kept per in-flight level (buckets 1, 2, 3-4, 5-8,
... 65+), each a moving average of the server time and of the in-flight count it was measured
at. Together they are the endpoint's own latency curve, and `server_time(n)` reads it at `n`
connections in flight: between two measured levels by linear interpolation, beyond the highest
along a line through the origin (a queue that keeps growing costs one more service time per
connection), below the lowest likewise. The lowest level is the pod's unloaded baseline. A
pod that serves one request after another has a straight curve (n-th in line waits n service
times); a pod stalled by its CPU quota has a flat one (everyone waits for the stall); a fixed
"service time x (in flight + 1)" model, fitted to either, mispredicts the other by the size of
the queue. The curve is made of the levels measured within `hold` seconds of the latest
sample.

**Averages.** Each figure is a moving average whose weight per sample is the larger of a
fixed weight (`rise` for a sample above the average, `fall` below) and the share of the time
constant `memory` that passed since the figure's last sample. Dense samples average over
about `1 / weight` of them; a figure not sampled for a while (a slow local pod kept idle while
traffic spills, probed now and then) is mostly replaced by the next sample instead of
decaying a tenth of the way per probe.

The default weights are **equal**. A peak-EWMA (Finagle's and Linkerd's jump straight to a
higher sample, `rise=1`) settles not at the mean but at an upper expectile: with rise twice
fall it settles where twice the mean excess above it equals the mean shortfall below it. For
a pod stalled by its CPU quota (most responses in 6 ms, one in seven after a 90 ms stall;
mean 18 ms) that is 27 ms, half as much again as what a connection costs on average. In the
edge grid that bias spilled two clients to a WAN node that cost more than the stalls did
(0.81x-0.87x local-only). A queue that forms needs no fast-rising average to show: the
in-flight count rises with it and is read from another level of the curve at once.

Pure: every method takes the time. Records are per endpoint address and are dropped when the
`Balancer` lets the address go (the same refcount as outlier detection).
"""

from __future__ import annotations

import bisect
import collections
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

EndpointKey = tuple[str, int]
LEVELS = 8  # in-flight levels: 1, 2, 3-4, 5-8, 9-16, 17-32, 33-64, 65+
MEMORY = 0.5  # s: a figure this long without a sample gives the next one 63 % of its weight
GAPS = 64  # silences (times between answers while requests await one) kept per endpoint


def level_of(in_flight: int) -> int:
    """The bucket of an in-flight count (this connection included, so at least 1)."""
    return min(LEVELS - 1, (max(1, in_flight) - 1).bit_length())


@dataclass(slots=True)
class EndpointSignal:
    """The running figures of one endpoint address (seconds; `-inf`: never sampled)."""

    connect: float = 0.0
    connect_samples: int = 0
    connect_at: float = -math.inf
    latency: list[float] = field(default_factory=lambda: [0.0] * LEVELS)
    load: list[float] = field(default_factory=lambda: [0.0] * LEVELS)
    level_samples: list[int] = field(default_factory=lambda: [0] * LEVELS)
    level_at: list[float] = field(default_factory=lambda: [-math.inf] * LEVELS)
    service_samples: int = 0
    service_at: float = -math.inf
    last_response: float = 0.0  # the latest raw first-byte time, for operators
    # (in flight, server time) of the levels measured within `hold` of the last sample,
    # ordered by in flight: what `server_time` reads (`curve`). Rebuilt when first read after
    # a sample, not on each one: a healthy node's lone local endpoint is never priced, and
    # the rebuild was ~5 % of a short connection's CPU. `_curve_horizon`: the oldest level
    # time the pending rebuild keeps (None: `_curve` is current).
    _curve: tuple[tuple[float, float], ...] = ()
    _curve_horizon: float | None = None
    # The last GAPS silences, in arrival order and sorted (what `residual` reads).
    gaps: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=GAPS))
    gaps_sorted: list[float] = field(default_factory=list)

    @property
    def curve(self) -> tuple[tuple[float, float], ...]:
        horizon = self._curve_horizon
        if horizon is not None:
            self._curve = tuple(
                sorted(
                    (self.load[i], self.latency[i])
                    for i in range(LEVELS)
                    if self.level_at[i] >= horizon
                )
            )
            self._curve_horizon = None
        return self._curve

    def residual(self, age: float) -> float:
        """Expected further wait for an answer, `age` seconds into a silence.

        Read from this endpoint's own silences: the mean of `gap - age` over those that lasted
        longer than `age`. A pod throttled by its CPU quota goes silent for most of every
        period; its history says the silence has far to go when it has just begun, and
        little when it is nearly over, so a connection is sent away early in a stall and
        kept late in one, instead of the other way round. Longer than any silence seen:
        as long again (nothing known says it ends sooner).
        """
        ordered = self.gaps_sorted
        longer = ordered[bisect.bisect_right(ordered, age) :]
        if not longer:
            return age
        return sum(longer) / len(longer) - age

    def server_time(self, in_flight: int) -> float:
        """Predicted server time with `in_flight` connections open (the new one included)."""
        curve = self.curve
        if not curve:
            return 0.0
        n = float(max(1, in_flight))
        low_load, low_latency = curve[0]
        if n <= low_load:
            return low_latency * n / low_load
        for high_load, high_latency in curve[1:]:
            if n <= high_load:
                span = high_load - low_load
                if span <= 0:
                    return high_latency
                return low_latency + (high_latency - low_latency) * (n - low_load) / span
            low_load, low_latency = high_load, high_latency
        return low_latency * n / low_load


class EndpointSignals:
    """The one owner of per-endpoint measurements; read by policies on the connection path."""

    def __init__(
        self,
        rise: float = 0.05,
        fall: float = 0.05,
        hold: float = 2.0,
        memory: float = MEMORY,
    ) -> None:
        if not 0 < rise <= 1 or not 0 < fall <= 1:
            raise ValueError(f"rise {rise!r} and fall {fall!r} must be in (0, 1]")
        if hold <= 0:
            raise ValueError(f"hold {hold!r} must be > 0")
        if memory <= 0:
            raise ValueError(f"memory {memory!r} must be > 0")
        self.rise = rise
        self.fall = fall
        self.hold = hold
        self.memory = memory
        # Read directly by policies on the connection path (a method call costs more than the
        # lookup); written only through the methods below.
        self.records: dict[EndpointKey, EndpointSignal] = {}

    def __len__(self) -> int:
        return len(self.records)

    def get(self, key: EndpointKey) -> EndpointSignal | None:
        return self.records.get(key)

    def _fold(self, value: float, sample: float, samples: int, since: float) -> float:
        """`value` moved toward `sample`; `since`: seconds since the figure's last sample."""
        if samples == 0:
            return sample
        weight = self.rise if sample > value else self.fall
        if since > 0:
            weight = max(weight, 1.0 - math.exp(-since / self.memory))
        return value + weight * (sample - value)

    def _record(self, key: EndpointKey) -> EndpointSignal:
        record = self.records.get(key)
        if record is None:
            record = self.records[key] = EndpointSignal()
        return record

    def connected(self, key: EndpointKey, seconds: float, now: float) -> None:
        """A dial succeeded after `seconds`."""
        record = self._record(key)
        record.connect = self._fold(
            record.connect, max(0.0, seconds), record.connect_samples, now - record.connect_at
        )
        record.connect_samples += 1
        record.connect_at = now

    def responded(
        self,
        key: EndpointKey,
        connect_seconds: float,
        response_seconds: float,
        in_flight: int,
        now: float,
    ) -> None:
        """The first response byte came `response_seconds` after the request went upstream.

        `connect_seconds` is this connection's own dial time (the round trip the response also
        paid); `in_flight` the proxy's open connections to the endpoint now, this one included.
        """
        record = self._record(key)
        served = max(0.0, response_seconds - max(0.0, connect_seconds))
        level = level_of(in_flight)
        samples = record.level_samples[level]
        since = now - record.level_at[level]
        if since > self.hold:
            samples = 0  # a stale level starts over rather than averaging with the past
        record.latency[level] = self._fold(record.latency[level], served, samples, since)
        load = float(max(1, in_flight))
        record.load[level] = (
            load if samples == 0 else record.load[level] + 0.2 * (load - record.load[level])
        )
        record.level_samples[level] = samples + 1
        record.level_at[level] = now
        record.service_samples += 1
        record.service_at = now
        record.last_response = response_seconds
        record._curve_horizon = now - self.hold

    def silence_ended(self, key: EndpointKey, gap: float) -> None:
        """An endpoint with requests awaiting an answer answered after `gap` seconds of
        silence (since its previous answer, or since it was handed work while idle)."""
        record = self._record(key)
        gaps = record.gaps
        ordered = record.gaps_sorted
        if len(gaps) == GAPS:
            del ordered[bisect.bisect_left(ordered, gaps[0])]
        gaps.append(gap)
        bisect.insort(ordered, gap)

    def forget(self, keys: Iterable[EndpointKey]) -> None:
        for key in keys:
            self.records.pop(key, None)

    def retain(self, keys: Iterable[EndpointKey]) -> None:
        keep = set(keys)
        for key in [k for k in self.records if k not in keep]:
            del self.records[key]

    def describe(self, key: EndpointKey, now: float) -> dict[str, Any] | None:
        record = self.records.get(key)
        if record is None:
            return None
        return {
            "connect_seconds": round(record.connect, 6),
            "connect_samples": record.connect_samples,
            "connect_age_seconds": _age(record.connect_at, now),
            "server_seconds_by_in_flight": [
                {"in_flight": round(load, 1), "server_seconds": round(latency, 6)}
                for load, latency in record.curve
            ],
            "last_response_seconds": round(record.last_response, 6),
            "service_samples": record.service_samples,
            "service_age_seconds": _age(record.service_at, now),
        }


def _age(at: float, now: float) -> float | None:
    return None if at == -math.inf else round(max(0.0, now - at), 3)
