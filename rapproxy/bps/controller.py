"""The BackupPodSet controller: informers → work queue → plan → writes, as one thin shell.

What it owns: three informers (BackupPodSets in every namespace, pods carrying the
`rapproxy.io/bps` label, Nodes), a de-duplicating work queue of set keys, a pool of workers, the
background activation tasks, and the expectations that bridge its own writes and its cache.
What it decides: nothing — `rapproxy.bps.plan.plan` does, from cached state only. A reconcile:

1. reads the set, its pods and the nodes from the informer stores (no API reads);
2. plans with the outstanding writes (`Expectations`) folded in, so a cache that lags the
   controller's own writes never makes it create or delete twice;
3. applies the actions concurrently — role patches are sent first (a promotion is one small
   label patch and nothing may delay it), creates and deletes go out beside them; every patch
   carries the pod's `metadata.resourceVersion` and every delete its `uid` as preconditions;
4. wakes cold backups in background tasks (`activate()` with a timeout): a slow or dead waiter
   never holds a worker, the task re-queues the set when it finishes, and a pod that could not be
   activated is replaced by the next plan;
5. writes `.status` through the `/status` subresource, only when it changed, and posts Events.

Errors re-queue the set with per-key exponential backoff; an invalid spec is a condition on the
object, never an exception that reaches the loop. Leader election (`run_controller`) makes sure
one instance per cluster does all this; the others keep nothing but a campaign loop.

Timings: `handling` is the controller's own part of a transition — from the informer delivering
the event to the last write of that reconcile being acknowledged — and is exported as a histogram
and, for failovers, in `status.lastFailover` beside the per-stage times.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from rapproxy.bps.activation import ActivationOutcome, ActivationResult, activate
from rapproxy.bps.activation import new_activation_token as new_token
from rapproxy.bps.events import NORMAL, WARNING, EventRecorder, InvolvedObject
from rapproxy.bps.expectations import Expectations
from rapproxy.bps.plan import (
    Activate,
    CreatePod,
    DeletePod,
    Demote,
    Plan,
    Promote,
    plan,
)
from rapproxy.bps.pod_template import DEFAULT_WAITER_COMMAND, build_pod
from rapproxy.bps.status import (
    FailoverRecord,
    build_status,
    invalid_status,
    merge_patch,
    settled_and_ready,
)
from rapproxy.cluster.client import (
    BACKUP_POD_SETS,
    NODES,
    PODS,
    ApiError,
    ClientSettings,
    Conflict,
    KubeClient,
    NotFound,
)
from rapproxy.cluster.informer import Callbacks, Informer, object_key
from rapproxy.cluster.leader import LeaderElector, LeaseSettings
from rapproxy.cluster.workqueue import RetryPolicy, ShutDown, WorkQueue
from rapproxy.config import BpsSettings, RapproxyConfiguration, parse_host_port
from rapproxy.model.bps import (
    LABEL_BPS,
    LABEL_ROLE,
    BackupPodSet,
    InvalidBackupPodSet,
    ObservedPod,
    Role,
    parse_backup_pod_set,
    parse_pod,
)
from rapproxy.model.errors import InvalidObject
from rapproxy.model.node import NodeInfo, parse_node

log = logging.getLogger(__name__)

Obj = dict[str, Any]
ActivationTarget = Callable[[BackupPodSet, ObservedPod], "tuple[str, int] | None"]
DEFAULT_WORKERS = 4
HANDLING_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
STAGE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 1.5, 2, 3, 5, 10, 30, 60)


class BpsMetrics:
    """The controller's Prometheus metrics, registered once per registry (they outlive terms)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry if registry is not None else CollectorRegistry()
        self.registry = r
        self.handling = Histogram(
            "rapproxy_bps_handling_duration_seconds",
            "Event observed to every write of the reconcile acknowledged.",
            buckets=HANDLING_BUCKETS,
            registry=r,
        )
        self.reconciles = Counter(
            "rapproxy_bps_reconciles_total", "Reconciles by result.", ["result"], registry=r
        )
        self.errors = Counter(
            "rapproxy_bps_reconcile_errors_total",
            "Reconciles that failed and were retried.",
            registry=r,
        )
        self.failovers = Counter(
            "rapproxy_bps_failovers_total",
            "Primary failures handled, by cause.",
            ["reason"],
            registry=r,
        )
        self.stage = Histogram(
            "rapproxy_bps_failover_stage_seconds",
            "Seconds from a primary failure being observed to each recovery stage.",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.activations = Counter(
            "rapproxy_bps_activations_total",
            "Cold-backup activations by outcome.",
            ["outcome"],
            registry=r,
        )
        self.writes = Counter(
            "rapproxy_bps_writes_total",
            "Pod writes by verb and result.",
            ["verb", "result"],
            registry=r,
        )
        self.leader = Gauge(
            "rapproxy_bps_leader", "1 while this instance holds the controller lease.", registry=r
        )


@dataclass(frozen=True, slots=True)
class ReconcileRecord:
    """One reconcile that wrote something (wall-clock seconds), kept for benchmarks and tests."""

    key: str
    triggered_at: float  # the informer delivered the first event that queued this reconcile
    started_at: float
    writes_done_at: float
    writes: int
    failed_writes: int

    @property
    def handling(self) -> float:
        return self.writes_done_at - self.triggered_at


def default_activation_target(bps: BackupPodSet, pod: ObservedPod) -> tuple[str, int] | None:
    return (pod.ip, bps.spec.activation.port) if pod.ip else None


class BpsController:
    """One controller term: construct, `await run()` while leading, cancel to stop."""

    def __init__(
        self,
        client: KubeClient,
        settings: BpsSettings,
        *,
        identity: str = "rapproxy-bps",
        metrics: BpsMetrics | None = None,
        workers: int = DEFAULT_WORKERS,
        activation_target: ActivationTarget = default_activation_target,
        waiter_command: Sequence[str] = DEFAULT_WAITER_COMMAND,
        bind_to_node: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.settings = settings
        self.identity = identity
        self.metrics = metrics or BpsMetrics()
        self.workers = workers
        self.activation_target = activation_target
        self.waiter_command = tuple(waiter_command)
        self.bind_to_node = bind_to_node
        self._clock = clock
        self.queue: WorkQueue[str] = WorkQueue(RetryPolicy(base_delay=0.005, max_delay=30.0))
        self.expectations = Expectations()
        self.events = EventRecorder(client, identity, clock=clock)
        self.sets = Informer(client, BACKUP_POD_SETS, Callbacks(self._on_set, self._on_set_deleted))
        self.pods = Informer(
            client,
            PODS,
            Callbacks(self._on_pod, self._on_pod_deleted),
            label_selector=LABEL_BPS,
        )
        self.nodes = Informer(client, NODES, Callbacks(self._on_node, self._on_node_deleted))
        self.ready = asyncio.Event()
        self.history: deque[ReconcileRecord] = deque(maxlen=10_000)
        self.failover_history: deque[FailoverRecord] = deque(maxlen=1000)
        self._queued_at: dict[str, float] = {}  # first event since the key was last dequeued
        self._last_event_at: dict[str, float] = {}  # latest event, for "final state observed"
        self._set_of_pod: dict[str, str] = {}  # pod store key → set key
        self._pods_of_set: dict[str, set[str]] = {}  # set key → pod store keys
        self._node_ready: dict[str, bool] = {}
        self._open_failover: dict[str, FailoverRecord] = {}
        self._last_failover: dict[str, FailoverRecord] = {}
        # Failed primaries already counted (set key → pod name → when), so one failure opens one
        # failover however many events and reconciles it spans.
        self._known_failures: dict[str, dict[str, float]] = {}
        # Primaries seen terminating or gone without our asking, straight from the informer:
        # several events may be coalesced into one reconcile that no longer sees the pod.
        self._lost_primaries: dict[str, dict[str, _LostPrimary]] = {}
        self._tasks: asyncio.TaskGroup | None = None
        self._session: aiohttp.ClientSession | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    async def run(self) -> None:
        """Run until cancelled: informers, event poster, workers, activation tasks."""
        try:
            async with aiohttp.ClientSession() as session, asyncio.TaskGroup() as tasks:
                self._session = session
                self._tasks = tasks
                tasks.create_task(self.events.run(), name="bps-events")
                for informer in (self.sets, self.pods, self.nodes):
                    tasks.create_task(informer.run(), name=f"bps-informer-{informer.name}")
                await asyncio.gather(self.sets.synced.wait(), self.pods.synced.wait())
                # Nodes are optional: without them failure detection ignores node health.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.nodes.synced.wait(), timeout=5.0)
                for key in list(self.sets.store):
                    self._enqueue(key)
                for i in range(self.workers):
                    tasks.create_task(self._worker(), name=f"bps-worker-{i}")
                self.ready.set()
                log.info(
                    "bps controller %s: reconciling %d set(s)", self.identity, len(self.sets.store)
                )
        finally:
            self.queue.shut_down()
            self._tasks = None
            self._session = None

    # -- informer handlers: record and enqueue, nothing else ----------------------------------
    def _enqueue(self, key: str) -> None:
        now = self._clock()
        self._queued_at.setdefault(key, now)
        self._last_event_at[key] = now
        self.queue.add(key)

    def _on_set(self, obj: Obj) -> None:
        self._enqueue(object_key(obj))

    def _on_set_deleted(self, obj: Obj) -> None:
        self._enqueue(object_key(obj))

    def _on_pod(self, obj: Obj) -> None:
        pod_key = object_key(obj)
        meta = obj.get("metadata") or {}
        set_name = (meta.get("labels") or {}).get(LABEL_BPS)
        previous = self._set_of_pod.get(pod_key)
        set_key = f"{meta.get('namespace') or 'default'}/{set_name}" if set_name else None
        if previous is not None and previous != set_key:
            self._unindex(pod_key, previous)
            self._enqueue(previous)
        if set_key is None:
            return
        self._set_of_pod[pod_key] = set_key
        self._pods_of_set.setdefault(set_key, set()).add(pod_key)
        pod = parse_pod(obj)
        if pod.deleting:
            self._note_lost_primary(set_key, pod, "terminating")
        self.expectations.observe(set_key, pod)
        self._enqueue(set_key)

    def _note_lost_primary(self, set_key: str, pod: ObservedPod, reason: str) -> None:
        flight = self.expectations.in_flight(set_key, self._clock())
        if flight.roles.get(pod.name, pod.role) is not Role.PRIMARY or pod.name in flight.deletes:
            return
        lost = self._lost_primaries.setdefault(set_key, {})
        if pod.name not in lost:
            lost[pod.name] = _LostPrimary(pod.name, pod.node_name, reason, self._clock())

    def _on_pod_deleted(self, obj: Obj) -> None:
        pod_key = object_key(obj)
        set_key = self._set_of_pod.get(pod_key)
        if set_key is None:
            return
        self._unindex(pod_key, set_key)
        pod = parse_pod(obj)
        self._note_lost_primary(set_key, pod, "terminating" if pod.deleting else "deleted")
        self.expectations.observe_gone(set_key, pod.name)
        self._enqueue(set_key)

    def _unindex(self, pod_key: str, set_key: str) -> None:
        self._set_of_pod.pop(pod_key, None)
        members = self._pods_of_set.get(set_key)
        if members is not None:
            members.discard(pod_key)
            if not members:
                del self._pods_of_set[set_key]

    def _on_node(self, obj: Obj) -> None:
        try:
            node = parse_node(obj)
        except InvalidObject:
            return
        if self._node_ready.get(node.name) != node.ready:
            first = node.name not in self._node_ready
            self._node_ready[node.name] = node.ready
            if not first or not node.ready:
                self._enqueue_sets_on(node.name)

    def _on_node_deleted(self, obj: Obj) -> None:
        name = str((obj.get("metadata") or {}).get("name", ""))
        self._node_ready.pop(name, None)
        self._enqueue_sets_on(name)

    def _enqueue_sets_on(self, node: str) -> None:
        for pod_key, set_key in list(self._set_of_pod.items()):
            pod = self.pods.store.get(pod_key)
            if pod is not None and (pod.get("spec") or {}).get("nodeName") == node:
                self._enqueue(set_key)

    # -- workers ------------------------------------------------------------------------------
    async def _worker(self) -> None:
        while True:
            try:
                key = await self.queue.get()
            except ShutDown:
                return
            triggered = self._queued_at.pop(key, self._clock())
            latest = self._last_event_at.pop(key, triggered)
            try:
                await self.reconcile(key, triggered, latest)
            except ApiError as error:
                self.metrics.errors.inc()
                self.metrics.reconciles.labels("error").inc()
                delay = self.queue.retry(key)
                log.info("bps %s: %s; retrying in %.3fs", key, error, delay)
            except Exception:
                self.metrics.errors.inc()
                self.metrics.reconciles.labels("error").inc()
                delay = self.queue.retry(key)
                log.exception("bps %s: reconcile failed; retrying in %.3fs", key, delay)
            else:
                self.metrics.reconciles.labels("ok").inc()
                self.queue.forget(key)
            finally:
                self.queue.done(key)

    def pods_of(self, bps: BackupPodSet) -> list[ObservedPod]:
        """The set's pods from the cache: labelled for it and controlled by this very object."""
        out = []
        for pod_key in self._pods_of_set.get(bps.key, ()):
            obj = self.pods.store.get(pod_key)
            if obj is None:
                continue
            pod = parse_pod(obj)
            if pod.owner_uid == bps.uid:
                out.append(pod)
        return out

    def _node_view(self) -> list[NodeInfo] | None:
        if not self.nodes.synced.is_set() or not self.nodes.store:
            return None  # unknown node health: never fail pods for it
        nodes = []
        for obj in self.nodes.store.values():
            with contextlib.suppress(InvalidObject):
                nodes.append(parse_node(obj))
        return nodes

    async def reconcile(
        self, key: str, triggered_at: float, latest_event_at: float | None = None
    ) -> None:
        """One pass for set `key`. `triggered_at`/`latest_event_at`: when the first and the
        last informer event that queued it arrived (the handling and restored clocks)."""
        obj = self.sets.store.get(key)
        if obj is None:
            self._forget(key)
            return
        try:
            bps = parse_backup_pod_set(obj)
        except InvalidBackupPodSet as error:
            await self._report_invalid(obj, error)
            return
        if bps.deleting:
            return  # the garbage collector removes the pods with their owner
        started = self._clock()
        pods = self.pods_of(bps)
        self.expectations.settle_against(key, {p.name for p in pods})
        flight = self.expectations.in_flight(key, started)
        result = plan(
            bps.spec,
            pods,
            self._node_view(),
            started,
            flight,
            not_ready_grace=self.settings.ready_grace,
        )
        record = self._track_failures(bps, result, triggered_at, flight.roles)
        writes, errors = await self._apply(bps, result)
        done = self._clock()
        if writes:
            self.metrics.handling.observe(done - triggered_at)
            self.history.append(
                ReconcileRecord(key, triggered_at, started, done, writes, len(errors))
            )
            if record is not None and record.handling_seconds is None:
                record.handling_seconds = done - record.detected
        self._track_restored(bps, result, latest_event_at or triggered_at)
        await self._write_status(obj, bps, result, done)
        if result.recheck_at is not None:
            self.queue.add_after(key, max(0.0, result.recheck_at - done))
        if not self.expectations.satisfied(key):
            self.queue.add_after(key, self.expectations.ttl + 0.1)
        if errors:
            raise errors[0]

    def _forget(self, key: str) -> None:
        self.expectations.forget(key)
        self._open_failover.pop(key, None)
        self._last_failover.pop(key, None)
        self._known_failures.pop(key, None)
        self._lost_primaries.pop(key, None)
        self._last_event_at.pop(key, None)

    # -- applying a plan ----------------------------------------------------------------------
    async def _apply(self, bps: BackupPodSet, result: Plan) -> tuple[int, list[ApiError]]:
        after_relabel = {a.pod.name: a for a in result.actions if isinstance(a, Activate)}
        relabelled = {a.pod.name for a in result.actions if isinstance(a, Promote | Demote)}
        first: list[Coroutine[Any, Any, None]] = []
        rest: list[Coroutine[Any, Any, None]] = []
        for action in result.actions:
            if isinstance(action, Promote | Demote):
                first.append(self._relabel(bps, action, after_relabel.get(action.pod.name)))
            elif isinstance(action, Activate):
                if action.pod.name not in relabelled:
                    self._start_activation(bps, action.pod, action.role)
            elif isinstance(action, CreatePod):
                rest.append(self._create(bps, action))
            elif isinstance(action, DeletePod):
                rest.append(self._delete(bps, action))
        writes = [*first, *rest]
        if not writes:
            return 0, []
        # Tasks start in list order, so the promotions' requests leave first.
        outcomes = await asyncio.gather(*writes, return_exceptions=True)
        errors: list[ApiError] = []
        for outcome in outcomes:
            if isinstance(outcome, ApiError):
                errors.append(outcome)
            elif isinstance(outcome, BaseException):
                raise outcome
        return len(writes), errors

    async def _relabel(
        self, bps: BackupPodSet, action: Promote | Demote, activation: Activate | None
    ) -> None:
        pod = action.pod
        key = bps.key
        self.expectations.role_sent(key, pod.name, action.to_role, self._clock())
        try:
            updated = await self._patch_role(pod, action.from_role, action.to_role)
        except ApiError:
            self.expectations.role_failed(key, pod.name)
            self.metrics.writes.labels("patch", "error").inc()
            raise
        if updated is None:
            self.expectations.role_failed(key, pod.name)
            return
        now = self._clock()
        self.metrics.writes.labels("patch", "ok").inc()
        verb = "Promoted" if isinstance(action, Promote) else "Demoted"
        self.events.record(
            _about(bps),
            NORMAL,
            verb,
            f"pod {pod.name}: {action.from_role} → {action.to_role}",
        )
        failover = self._open_failover.get(key)
        if (
            failover is not None
            and action.to_role is Role.PRIMARY
            and failover.promoted is None
            and isinstance(action, Promote)
        ):
            failover.promoted = now
            failover.promoted_pod = pod.name
        if activation is not None:
            self._start_activation(bps, parse_pod(updated), activation.role)

    async def _patch_role(self, pod: ObservedPod, from_role: Role, to_role: Role) -> Obj | None:
        """Merge-patch the role label with a resourceVersion precondition; None if the pod is
        gone or no longer what we planned on. On a stale version, re-read once and retry."""
        version = pod.resource_version
        for attempt in range(2):
            body = {"metadata": {"labels": {LABEL_ROLE: str(to_role)}, "resourceVersion": version}}
            try:
                return await self.client.patch(PODS, pod.name, body, pod.namespace)
            except NotFound:
                return None
            except Conflict:
                if attempt:
                    raise
            # The kubelet may have written the pod's status since our cache saw it: re-check the
            # pod still is the backup we planned to move, then try again at its new version.
            try:
                fresh = parse_pod(await self.client.get(PODS, pod.name, pod.namespace))
            except NotFound:
                return None
            if fresh.uid != pod.uid or fresh.deleting or fresh.role not in (from_role, to_role):
                return None
            version = fresh.resource_version
        return None

    async def _create(self, bps: BackupPodSet, action: CreatePod) -> None:
        key = bps.key
        token = new_token() if action.role is Role.COLD_BACKUP else None
        manifest = build_pod(
            bps,
            action.role,
            node_hint=action.node_hint,
            bind_to_node=self.bind_to_node,
            activation_token=token,
            waiter_command=self.waiter_command,
        )
        self.expectations.create_sent(key, action.role)
        try:
            created = await self.client.create(PODS, manifest, bps.namespace)
        except ApiError as error:
            self.expectations.create_answered(key, action.role, None, False, self._clock())
            self.metrics.writes.labels("create", "error").inc()
            self.events.record(_about(bps), WARNING, "FailedCreate", f"{action.role}: {error}")
            raise
        now = self._clock()
        name = str((created.get("metadata") or {}).get("name", ""))
        seen = f"{bps.namespace}/{name}" in self.pods.store
        self.expectations.create_answered(key, action.role, name, seen, now)
        self.metrics.writes.labels("create", "ok").inc()
        self.events.record(
            _about(bps), NORMAL, "SuccessfulCreate", f"created {action.role} pod {name}"
        )
        failover = self._open_failover.get(key)
        if failover is not None and failover.replacement_created is None:
            failover.replacement_created = now

    async def _delete(self, bps: BackupPodSet, action: DeletePod) -> None:
        key = bps.key
        pod = action.pod
        self.expectations.delete_sent(key, pod.name, self._clock())
        try:
            await self.client.delete(
                PODS, pod.name, pod.namespace, preconditions={"uid": pod.uid} if pod.uid else None
            )
        except (NotFound, Conflict):
            # Gone already, or the name now belongs to another pod: nothing of ours to delete.
            self.expectations.delete_failed(key, pod.name)
            return
        except ApiError as error:
            self.expectations.delete_failed(key, pod.name)
            self.metrics.writes.labels("delete", "error").inc()
            self.events.record(_about(bps), WARNING, "FailedDelete", f"pod {pod.name}: {error}")
            raise
        self.metrics.writes.labels("delete", "ok").inc()
        self.events.record(
            _about(bps),
            NORMAL,
            "SuccessfulDelete",
            f"deleted {pod.role or 'role-less'} pod {pod.name} ({action.reason}: {action.detail})",
        )

    # -- activation, off the reconcile path ---------------------------------------------------
    def _start_activation(self, bps: BackupPodSet, pod: ObservedPod, role: Role) -> None:
        if self._tasks is None or self._session is None:
            return
        target = self.activation_target(bps, pod)
        if target is None or pod.activation_token is None:
            return  # no IP yet: a later pod event re-plans the activation
        if pod.name in self.expectations.in_flight(bps.key, self._clock()).activations:
            return
        self.expectations.activation_started(bps.key, pod.name)
        timeout = min(self.settings.activation_timeout, bps.spec.activation.timeout_seconds)
        self._tasks.create_task(
            self._activate(
                bps, pod, role=role, target=target, token=pod.activation_token, timeout=timeout
            ),
            name=f"bps-activate-{pod.name}",
        )

    async def _activate(
        self,
        bps: BackupPodSet,
        pod: ObservedPod,
        *,
        role: Role,
        target: tuple[str, int],
        token: str,
        timeout: float,  # noqa: ASYNC109 - activate() turns expiry into a result
    ) -> None:
        assert self._session is not None
        try:
            result = await activate(self._session, target[0], target[1], token, timeout)
        except Exception as error:  # a bug here must not leave the pod marked as activating
            log.exception("bps %s: activating %s failed unexpectedly", bps.key, pod.name)
            result = ActivationResult(ActivationOutcome.UNEXPECTED, repr(error), 0.0, 0)
        now = self._clock()
        self.expectations.activation_finished(bps.key, pod.name, result.ok, now)
        self.metrics.activations.labels(str(result.outcome)).inc()
        if result.ok:
            self.events.record(
                _about(bps),
                NORMAL,
                "Activated",
                f"cold backup {pod.name} activated as {role} in {result.elapsed * 1000:.0f} ms",
            )
            failover = self._open_failover.get(bps.key)
            if failover is not None and failover.activated is None:
                failover.activated = now
        else:
            self.events.record(
                _about(bps),
                WARNING,
                "ActivationFailed",
                f"cold backup {pod.name}: {result.outcome} ({result.detail}); replacing it",
            )
        self._enqueue(bps.key)

    # -- failover bookkeeping -----------------------------------------------------------------
    def _track_failures(
        self,
        bps: BackupPodSet,
        result: Plan,
        triggered_at: float,
        roles: Mapping[str, Role],
    ) -> FailoverRecord | None:
        """Open a failover record when a primary is newly seen failed (or vanished)."""
        key = bps.key
        now = self._clock()
        known = self._known_failures.setdefault(key, {})
        fresh: list[_LostPrimary] = []
        for lost in self._lost_primaries.pop(key, {}).values():
            if lost.name not in known:
                known[lost.name] = now
                fresh.append(lost)
        for failure in result.failures:
            name = failure.pod.name
            if name in known:
                continue
            known[name] = now
            if roles.get(name, failure.pod.role) is Role.PRIMARY:
                fresh.append(
                    _LostPrimary(name, failure.pod.node_name, str(failure.reason), triggered_at)
                )
        cached = {f.pod.name for f in result.failures} | {
            n for names in result.pods_by_role.values() for n in names
        }
        for name in [n for n, at in known.items() if n not in cached and now - at > 60.0]:
            del known[name]
        if not fresh:
            return None
        for lost in fresh:
            self.metrics.failovers.labels(lost.reason).inc()
            self.events.record(
                _about(bps), WARNING, "PrimaryFailed", f"primary {lost.name} failed: {lost.reason}"
            )
        record = self._open_failover.get(key)
        if record is None:
            first = min(fresh, key=lambda lost: lost.observed_at)
            # The informer's delivery of the failure itself, not an earlier event the key was
            # already queued for: that would charge the controller for time it was not told.
            record = FailoverRecord(
                first.name, first.reason, first.node, detected=first.observed_at
            )
            self._open_failover[key] = record
        return record

    def _track_restored(self, bps: BackupPodSet, result: Plan, observed_at: float) -> None:
        record = self._open_failover.get(bps.key)
        if record is None or not settled_and_ready(result):
            return
        stages = [t for t in record.stage_times().values() if t is not None]
        record.restored = max([observed_at, record.detected, *stages])
        del self._open_failover[bps.key]
        self._last_failover[bps.key] = record
        self.failover_history.append(record)
        for stage, at in record.stage_times().items():
            if at is not None:
                self.metrics.stage.labels(stage).observe(at - record.detected)
        self.events.record(
            _about(bps),
            NORMAL,
            "FailoverComplete",
            f"primary {record.failed_pod} replaced by {record.promoted_pod or '?'}; restored in "
            f"{(record.restored - record.detected) * 1000:.0f} ms",
        )

    # -- status -------------------------------------------------------------------------------
    async def _write_status(self, obj: Obj, bps: BackupPodSet, result: Plan, now: float) -> None:
        current = obj.get("status") or {}
        record = self._open_failover.get(bps.key) or self._last_failover.get(bps.key)
        wanted = build_status(bps, result, current, record, now)
        await self._patch_status(obj, current, wanted)

    async def _patch_status(self, obj: Obj, current: Obj, wanted: Obj) -> None:
        patch = merge_patch(current, wanted)
        if not patch:
            return
        meta = obj.get("metadata") or {}
        try:
            await self.client.patch(
                BACKUP_POD_SETS,
                str(meta.get("name")),
                {"status": patch},
                str(meta.get("namespace") or "default"),
                subresource="status",
            )
        except NotFound:
            return

    async def _report_invalid(self, obj: Obj, error: InvalidBackupPodSet) -> None:
        meta = obj.get("metadata") or {}
        raw_generation = meta.get("generation")
        generation = raw_generation if isinstance(raw_generation, int) else 0
        current = obj.get("status") or {}
        wanted = invalid_status(current, generation, error.field, error.reason, self._clock())
        log.warning("%s", error)
        self.events.record(
            InvolvedObject(
                str(meta.get("namespace") or "default"),
                str(meta.get("name")),
                str(meta.get("uid", "")),
            ),
            WARNING,
            "InvalidSpec",
            f"{error.field}: {error.reason}",
        )
        await self._patch_status(obj, current, wanted)


@dataclass(frozen=True, slots=True)
class _LostPrimary:
    name: str
    node: str | None
    reason: str
    observed_at: float


def _about(bps: BackupPodSet) -> InvolvedObject:
    return InvolvedObject(bps.namespace, bps.name, bps.uid)


# -- entry points ---------------------------------------------------------------------------------


def lease_settings(settings: BpsSettings, identity: str) -> LeaseSettings:
    return LeaseSettings(
        name=settings.lease_name,
        namespace=settings.lease_namespace,
        identity=identity,
        lease_duration=settings.lease_duration,
        renew_deadline=settings.renew_deadline,
        retry_period=settings.retry_period,
    )


def default_identity(node_name: str | None = None) -> str:
    """client-go's convention: host name plus a random suffix, unique per process."""
    return f"{node_name or socket.gethostname()}_{uuid.uuid4().hex[:8]}"


async def run_controller(
    client: KubeClient,
    settings: BpsSettings,
    identity: str,
    registry: CollectorRegistry | None = None,
    **controller_options: Any,
) -> None:
    """Campaign for the BPS Lease and, while leading, run the controller. Runs until cancelled;
    cancelling releases the Lease so another instance takes over within a retry period."""
    if not settings.enabled:
        return
    metrics = BpsMetrics(registry)
    elector = LeaderElector(client, lease_settings(settings, identity))

    async def lead() -> None:
        metrics.leader.set(1)
        try:
            await BpsController(
                client, settings, identity=identity, metrics=metrics, **controller_options
            ).run()
        finally:
            metrics.leader.set(0)

    await elector.run(lead)


def metrics_application(registry: CollectorRegistry) -> web.Application:
    async def serve_metrics(_: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(registry))
        response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        response.charset = "utf-8"
        return response

    async def serve_health(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    app = web.Application()
    app.router.add_get("/metrics", serve_metrics)
    app.router.add_get("/healthz", serve_health)
    app.router.add_get("/livez", serve_health)
    return app


async def run_standalone(config: RapproxyConfiguration, identity: str | None = None) -> None:
    """`rapproxy bps-controller`: the controller alone, with /metrics and /healthz on the
    configured metrics address; SIGTERM/SIGINT release the Lease and return."""
    client = await KubeClient.connect(
        ClientSettings(
            config.client_connection.kubeconfig,
            config.client_connection.context,
            config.client_connection.request_timeout,
        )
    )
    registry = CollectorRegistry()
    host, port = parse_host_port(config.metrics_bind_address, "metricsBindAddress")
    runner = web.AppRunner(metrics_application(registry), access_log=None)
    await runner.setup()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await web.TCPSite(runner, host, port).start()
        settings = config.bps if config.bps.enabled else _enabled(config.bps)
        task = asyncio.create_task(
            run_controller(client, settings, identity or default_identity(), registry)
        )
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait([task, stopping], return_when=asyncio.FIRST_COMPLETED)
        for pending in (task, stopping):
            pending.cancel()
        for pending in (task, stopping):
            with contextlib.suppress(asyncio.CancelledError):
                await pending
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signum)
        await runner.cleanup()
        await client.close()


def _enabled(settings: BpsSettings) -> BpsSettings:
    import dataclasses

    return dataclasses.replace(settings, enabled=True)
