"""The BackupPodSet `.status` the controller writes: counts, pods, conditions, the last failover.

Pure: built from a `Plan`, the previous status and `now`, so the controller writes the status only
when this function's answer differs from what the object already carries (a status write is a
watch event; writing an unchanged status on every reconcile would make the controller wake
itself forever). Condition `lastTransitionTime`s are kept unless the condition's status flips,
as the API conventions ask.

Shape (all optional for readers; `bpsctl` tolerates any subset)::

    observedGeneration: 4
    replicas: 3            readyReplicas: 3         # primaries
    hotBackups: 3          readyHotBackups: 3
    coldBackups: 3
    pods: {primary: [..], hotBackup: [..], coldBackup: [..]}
    conditions: [{type: Available|Progressing|InvalidSpec, status, reason, message,
                  lastTransitionTime, observedGeneration}]
    lastFailover: {failedPod, reason, node, promotedPod, detectedAt, promotedAt, activatedAt,
                   replacementCreatedAt, restoredAt, handlingSeconds,
                   durations: {promoted, activated, replacementCreated, restored}}
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rapproxy.bps.plan import Plan
from rapproxy.model.bps import BackupPodSet, Role

AVAILABLE = "Available"
PROGRESSING = "Progressing"
INVALID_SPEC = "InvalidSpec"
STAGES = ("promoted", "activated", "replacementCreated", "restored")
POD_KEYS = {Role.PRIMARY: "primary", Role.HOT_BACKUP: "hotBackup", Role.COLD_BACKUP: "coldBackup"}


def rfc3339(at: float) -> str:
    """metav1.Time: whole seconds, UTC."""
    return datetime.datetime.fromtimestamp(at, tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def rfc3339_millis(at: float) -> str:
    """A stage timestamp: milliseconds matter when a failover takes a fraction of a second."""
    moment = datetime.datetime.fromtimestamp(at, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


@dataclass(slots=True)
class FailoverRecord:
    """One primary failure and its recovery, stage by stage (epoch seconds; None: not yet).

    Mutable and owned by the controller while the failover runs; `to_status()` renders it.
    `handling_seconds` is the controller's own part: failure observed → its writes acknowledged.
    """

    failed_pod: str
    reason: str
    node: str | None
    detected: float
    promoted_pod: str | None = None
    promoted: float | None = None
    activated: float | None = None
    replacement_created: float | None = None
    restored: float | None = None
    handling_seconds: float | None = None

    def stage_times(self) -> dict[str, float | None]:
        return {
            "promoted": self.promoted,
            "activated": self.activated,
            "replacementCreated": self.replacement_created,
            "restored": self.restored,
        }

    def to_status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "failedPod": self.failed_pod,
            "reason": self.reason,
            "detectedAt": rfc3339_millis(self.detected),
        }
        if self.node:
            out["node"] = self.node
        if self.promoted_pod:
            out["promotedPod"] = self.promoted_pod
        durations: dict[str, float] = {}
        for stage, at in self.stage_times().items():
            if at is not None:
                out[f"{stage}At"] = rfc3339_millis(at)
                durations[stage] = round(max(0.0, at - self.detected), 4)
        if durations:
            out["durations"] = durations
        if self.handling_seconds is not None:
            out["handlingSeconds"] = round(self.handling_seconds, 4)
        return out


def merge_patch(current: Mapping[str, Any], wanted: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns `current` into `wanted`; {} when equal.

    A merge patch only adds and replaces: a key the new status no longer has (a new failover's
    `restoredAt`, not reached yet) must be sent as null, or the old failover's value survives
    beside the new one's.
    """
    patch: dict[str, Any] = {key: None for key in current if key not in wanted}
    for key, value in wanted.items():
        old = current.get(key)
        if isinstance(value, Mapping) and isinstance(old, Mapping):
            nested = merge_patch(old, value)
            if nested:
                patch[key] = nested
        elif key not in current or old != value:
            patch[key] = value
    return patch


def condition(
    previous: Sequence[Mapping[str, Any]],
    kind: str,
    *,
    status: bool,
    reason: str,
    message: str,
    generation: int,
    now: float,
) -> dict[str, Any]:
    text = "True" if status else "False"
    old = next((c for c in previous if c.get("type") == kind), None)
    since = (
        old.get("lastTransitionTime")
        if old is not None and old.get("status") == text and old.get("lastTransitionTime")
        else rfc3339(now)
    )
    return {
        "type": kind,
        "status": text,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since,
        "observedGeneration": generation,
    }


def _previous_conditions(previous: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    raw = previous.get("conditions") or []
    return [c for c in raw if isinstance(c, Mapping)] if isinstance(raw, list) else []


def build_status(
    bps: BackupPodSet,
    result: Plan,
    previous: Mapping[str, Any],
    failover: FailoverRecord | None,
    now: float,
) -> dict[str, Any]:
    """The status for a valid set after planning `result`."""
    counts = result.counts
    prior = _previous_conditions(previous)
    primaries = counts[Role.PRIMARY]
    available = primaries.ready >= primaries.desired
    settled = settled_and_ready(result)
    gen = bps.generation
    status: dict[str, Any] = {
        "observedGeneration": gen,
        "replicas": primaries.alive,
        "readyReplicas": primaries.ready,
        "hotBackups": counts[Role.HOT_BACKUP].alive,
        "readyHotBackups": counts[Role.HOT_BACKUP].ready,
        "coldBackups": counts[Role.COLD_BACKUP].alive,
        "pods": {POD_KEYS[role]: list(names) for role, names in result.pods_by_role.items()},
        "conditions": [
            condition(
                prior,
                AVAILABLE,
                status=available,
                reason="PrimariesReady" if available else "PrimariesMissing",
                message=f"{primaries.ready} of {primaries.desired} primaries ready",
                generation=gen,
                now=now,
            ),
            condition(
                prior,
                PROGRESSING,
                status=not settled,
                reason="Converged" if settled else "Reconciling",
                message="every role has its desired pods, ready"
                if settled
                else _progress_message(result),
                generation=gen,
                now=now,
            ),
            condition(
                prior,
                INVALID_SPEC,
                status=False,
                reason="Valid",
                message="the spec is valid",
                generation=gen,
                now=now,
            ),
        ],
    }
    if failover is not None:
        status["lastFailover"] = failover.to_status()
    elif isinstance(previous.get("lastFailover"), Mapping):
        status["lastFailover"] = dict(previous["lastFailover"])
    return status


def settled_and_ready(result: Plan) -> bool:
    """Converged, and every primary and hot backup Ready (cold backups are never Ready)."""
    counts = result.counts
    return (
        result.converged
        and counts[Role.PRIMARY].ready >= counts[Role.PRIMARY].desired
        and counts[Role.HOT_BACKUP].ready >= counts[Role.HOT_BACKUP].desired
    )


def _progress_message(result: Plan) -> str:
    parts = []
    for role, count in result.counts.items():
        if count.alive != count.desired or count.in_flight:
            text = f"{role} {count.alive}/{count.desired}"
            if count.in_flight:
                text += f" (+{count.in_flight} starting)"
            parts.append(text)
        elif role is not Role.COLD_BACKUP and count.ready < count.desired:
            parts.append(f"{role} {count.ready}/{count.desired} ready")
    return "; ".join(parts) or "waiting for pods to become ready"


def invalid_status(
    previous: Mapping[str, Any], generation: int, field: str, reason: str, now: float
) -> dict[str, Any]:
    """Keep what was observed, flag the spec: the controller leaves the pods as they are."""
    prior = _previous_conditions(previous)
    status = {k: v for k, v in previous.items() if k != "conditions"}
    status["observedGeneration"] = generation
    kept = [dict(c) for c in prior if c.get("type") not in (INVALID_SPEC, PROGRESSING)]
    status["conditions"] = [
        *kept,
        condition(
            prior,
            PROGRESSING,
            status=False,
            reason="InvalidSpec",
            message="not reconciling until the spec is fixed",
            generation=generation,
            now=now,
        ),
        condition(
            prior,
            INVALID_SPEC,
            status=True,
            reason="InvalidField",
            message=f"{field}: {reason}",
            generation=generation,
            now=now,
        ),
    ]
    return status
