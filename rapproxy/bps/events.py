"""Kubernetes Events about BackupPodSets, posted off the reconcile path.

Events are for people (`bpsctl describe`, `kubectl describe bps`), so they must never slow a
failover: `record()` only queues, and one owned task posts them. The queue is bounded; when the
API is slow and it fills, the oldest news is dropped, never the controller's time. The same
(object, reason, message) within `dedup_window` seconds is posted once, so a set that keeps
failing validation does not write an Event on every resync.

Core `v1` Events (what `kubectl describe` and `kubectl get events` read), created with
`generateName`, so no read-modify-write is needed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from rapproxy.bps.status import rfc3339
from rapproxy.cluster.client import EVENTS, ApiError, KubeClient
from rapproxy.model.bps import API_VERSION, KIND

COMPONENT = "rapproxy-bps-controller"
NORMAL = "Normal"
WARNING = "Warning"


@dataclass(frozen=True, slots=True)
class InvolvedObject:
    namespace: str
    name: str
    uid: str
    kind: str = KIND
    api_version: str = API_VERSION


@dataclass(frozen=True, slots=True)
class PendingEvent:
    about: InvolvedObject
    type: str
    reason: str
    message: str
    at: float


class EventRecorder:
    def __init__(
        self,
        client: KubeClient,
        instance: str,
        *,
        capacity: int = 1000,
        dedup_window: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.instance = instance
        self.dedup_window = dedup_window
        self._clock = clock
        self._queue: asyncio.Queue[PendingEvent] = asyncio.Queue(maxsize=capacity)
        self._recent: OrderedDict[tuple[str, str, str, str], float] = OrderedDict()
        self.posted = 0
        self.dropped = 0

    def record(self, about: InvolvedObject, type_: str, reason: str, message: str) -> None:
        now = self._clock()
        dedup = (about.uid, type_, reason, message)
        last = self._recent.get(dedup)
        if last is not None and now - last < self.dedup_window:
            return
        self._recent[dedup] = now
        self._recent.move_to_end(dedup)
        while len(self._recent) > 4096:
            self._recent.popitem(last=False)
        if self._queue.full():
            self._queue.get_nowait()
            self._queue.task_done()
            self.dropped += 1
        self._queue.put_nowait(PendingEvent(about, type_, reason, message, now))

    async def run(self) -> None:
        """Post queued events until cancelled; API errors are logged, not raised."""
        while True:
            pending = await self._queue.get()
            try:
                await self.client.create(EVENTS, self._body(pending), pending.about.namespace)
                self.posted += 1
            except ApiError as error:
                logging.getLogger(__name__).warning(
                    "could not post event %s for %s/%s: %s",
                    pending.reason,
                    pending.about.namespace,
                    pending.about.name,
                    error,
                )
            finally:
                self._queue.task_done()

    async def flush(self) -> None:
        """Wait until every queued event has been posted (or failed)."""
        await self._queue.join()

    def _body(self, event: PendingEvent) -> dict[str, object]:
        about = event.about
        stamp = rfc3339(event.at)
        return {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{about.name}.", "namespace": about.namespace},
            "involvedObject": {
                "apiVersion": about.api_version,
                "kind": about.kind,
                "name": about.name,
                "namespace": about.namespace,
                "uid": about.uid,
            },
            "type": event.type,
            "reason": event.reason,
            "message": event.message,
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
            "reportingInstance": self.instance,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
