"""Leader election on a `coordination.k8s.io/v1` Lease, released on shutdown.

Every rapproxy instance runs the BackupPodSet controller, but only the Lease holder reconciles.
The algorithm is client-go's `leaderelection`:

* the holder renews `renewTime` every `retry_period`; if it cannot renew for `renew_deadline`
  it stops leading *before* the lease can expire (`renew_deadline < lease_duration`), so two
  leaders never overlap on a sane clock;
* a candidate takes the lease over only when it has watched the same record unchanged for a
  full `lease_duration` — timed on the candidate's own monotonic clock from when *it* observed
  the record, never by comparing the holder's timestamps with its own (clock skew);
* every write is a PUT with the observed `resourceVersion`, so two candidates cannot both win.

Unlike kubernetes-asyncio's elector, `release()` runs on graceful shutdown: the lease is
rewritten with an empty holder and a 1 s duration, so a successor takes over within about one
retry period instead of a whole lease duration.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from rapproxy.cluster.client import LEASES, ApiError, Conflict, KubeClient, NotFound

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LeaseSettings:
    name: str
    namespace: str
    identity: str
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def __post_init__(self) -> None:
        if not self.retry_period < self.renew_deadline < self.lease_duration:
            raise ValueError("need retry_period < renew_deadline < lease_duration")


def micro_time(at: float) -> str:
    """A Lease MicroTime: RFC 3339 with exactly six fractional digits."""
    moment = datetime.datetime.fromtimestamp(at, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    def __init__(
        self,
        client: KubeClient,
        settings: LeaseSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        release_on_exit: bool = True,
    ) -> None:
        self.client = client
        self.release_on_exit = release_on_exit
        self.settings = settings
        self._clock = clock
        self._wall_clock = wall_clock
        self._observed: dict[str, Any] | None = None
        self._observed_at = 0.0
        self._last_renew = 0.0
        self.is_leader = False
        self.transitions = 0

    async def run(self, lead: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Campaign forever; while leading, run `lead()` and cancel it when leadership is lost.

        Cancelling `run` releases the lease if held.
        """
        tasks: list[asyncio.Task[None]] = []
        try:
            while True:
                await self._acquire()
                log.info(
                    "%s: became leader of lease %s/%s",
                    self.settings.identity,
                    self.settings.namespace,
                    self.settings.name,
                )
                work = asyncio.create_task(lead(), name="leader-work")
                renewing = asyncio.create_task(self._renew_until_lost(), name="lease-renew")
                tasks = [work, renewing]
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                await _cancel(tasks)
                tasks = []
                self.is_leader = False
                if work.done() and not work.cancelled() and work.exception() is not None:
                    log.error("leader work failed; giving up the lease", exc_info=work.exception())
                    await self.release()
                else:
                    log.warning("%s: lost the lease", self.settings.identity)
        finally:
            await _cancel(tasks)
            if self.is_leader and self.release_on_exit:
                await asyncio.shield(self.release())

    async def _acquire(self) -> None:
        while True:
            try:
                if await self._try_acquire_or_renew():
                    self.is_leader = True
                    return
            except ApiError as error:
                log.info("lease %s: %s", self.settings.name, error)
            await asyncio.sleep(self.settings.retry_period)

    async def _renew_until_lost(self) -> None:
        while True:
            await asyncio.sleep(self.settings.retry_period)
            try:
                if await self._try_acquire_or_renew():
                    continue
            except ApiError as error:
                log.warning("lease %s: renew failed: %s", self.settings.name, error)
            if self._clock() - self._last_renew >= self.settings.renew_deadline:
                return

    def _record(self, at: float, acquire_time: str | None, transitions: int) -> dict[str, Any]:
        now = micro_time(at)
        return {
            "holderIdentity": self.settings.identity,
            "leaseDurationSeconds": max(1, round(self.settings.lease_duration)),
            "acquireTime": acquire_time or now,
            "renewTime": now,
            "leaseTransitions": transitions,
        }

    async def _try_acquire_or_renew(self) -> bool:
        s = self.settings
        now_wall = self._wall_clock()
        try:
            lease = await self.client.get(LEASES, s.name, s.namespace)
        except NotFound:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": s.name, "namespace": s.namespace},
                "spec": self._record(now_wall, None, 0),
            }
            try:
                created = await self.client.create(LEASES, body, s.namespace)
            except Conflict:
                return False  # someone else created it first
            self._observe(created)
            self._last_renew = self._clock()
            return True

        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        if self._observed is None or _spec_of(self._observed) != spec:
            self._observe(lease)
        duration = float(spec.get("leaseDurationSeconds") or s.lease_duration)
        held_by_other = holder not in ("", s.identity)
        if held_by_other and self._clock() - self._observed_at < duration:
            return False
        transitions = int(spec.get("leaseTransitions") or 0)
        acquire_time = spec.get("acquireTime") if holder == s.identity else None
        if holder != s.identity:
            transitions += 1
        updated = dict(lease)
        updated["spec"] = self._record(now_wall, acquire_time, transitions)
        try:
            written = await self.client.replace(LEASES, s.name, updated, s.namespace)
        except Conflict:
            return False
        if holder != s.identity:
            self.transitions += 1
        self._observe(written)
        self._last_renew = self._clock()
        return True

    def _observe(self, lease: dict[str, Any]) -> None:
        self._observed = lease
        self._observed_at = self._clock()

    async def release(self) -> bool:
        """Give the lease up at once (empty holder, 1 s duration). True when released."""
        s = self.settings
        try:
            lease = await self.client.get(LEASES, s.name, s.namespace)
            if (lease.get("spec") or {}).get("holderIdentity") != s.identity:
                return False
            released = dict(lease)
            released["spec"] = {
                **(lease.get("spec") or {}),
                "holderIdentity": "",
                "leaseDurationSeconds": 1,
                "renewTime": micro_time(self._wall_clock()),
            }
            await self.client.replace(LEASES, s.name, released, s.namespace)
        except ApiError as error:
            log.warning("could not release lease %s: %s", s.name, error)
            return False
        self.is_leader = False
        log.info("%s: released lease %s/%s", s.identity, s.namespace, s.name)
        return True


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        if not task.done():
            task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


def _spec_of(lease: dict[str, Any]) -> Any:
    return lease.get("spec") or {}
