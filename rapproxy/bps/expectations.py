"""What the controller has asked the API to do and its informer cache has not shown yet.

The controller plans from its informer cache, and the cache lags its own writes by a watch event.
Without a memory of outstanding writes, a reconcile that runs between "create acknowledged" and
"pod seen" would create the pod again (the ReplicaSet controller's `expectations` exist for
exactly this). Here every outstanding write is remembered per BackupPodSet and turned into the
planner's `InFlight`:

* creates: counted from the moment the request is sent; once answered, remembered by the pod
  name the server generated until the informer shows that pod;
* deletes: until the informer shows the pod terminating or gone;
* role patches: until the informer shows the new role label;
* activations: while the POST runs, then until the pod's waiter is seen finished; a failed
  activation is remembered until the pod is gone, so the planner replaces the pod.

Every remembered write expires after `ttl` seconds (a lost watch event must not wedge a set
forever); the informer's next relist or event makes the state right again.

Pure bookkeeping: no I/O; callers pass `now`.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass, field

from rapproxy.bps.plan import InFlight
from rapproxy.model.bps import ObservedPod, Role, WaiterState

DEFAULT_TTL_SECONDS = 30.0
log = logging.getLogger(__name__)


@dataclass(slots=True)
class _SetExpectations:
    sending: dict[Role, int] = field(default_factory=dict)  # creates not answered yet
    created: dict[str, tuple[Role, float]] = field(default_factory=dict)  # name → role, expiry
    deletes: dict[str, float] = field(default_factory=dict)  # name → expiry
    roles: dict[str, tuple[Role, float]] = field(default_factory=dict)
    activating: set[str] = field(default_factory=set)  # POST /activate running
    activated: dict[str, float] = field(default_factory=dict)  # 200 seen, waiter not yet done
    failed: dict[str, float] = field(default_factory=dict)  # activation failed; until pod gone

    def empty(self) -> bool:
        return not (
            any(self.sending.values())
            or self.created
            or self.deletes
            or self.roles
            or self.activating
            or self.activated
            or self.failed
        )


class Expectations:
    """Outstanding writes per BackupPodSet key (`namespace/name`)."""

    def __init__(self, ttl: float = DEFAULT_TTL_SECONDS) -> None:
        self.ttl = ttl
        self._sets: dict[str, _SetExpectations] = {}

    def _of(self, key: str) -> _SetExpectations:
        return self._sets.setdefault(key, _SetExpectations())

    # -- what the planner sees ---------------------------------------------------------------
    def in_flight(self, key: str, now: float) -> InFlight:
        state = self._sets.get(key)
        if state is None:
            return InFlight()
        self._expire(key, state, now)
        creates: dict[Role, int] = {role: n for role, n in state.sending.items() if n > 0}
        for role, _ in state.created.values():
            creates[role] = creates.get(role, 0) + 1
        return InFlight(
            creates=creates,
            deletes=frozenset(state.deletes),
            roles={name: role for name, (role, _) in state.roles.items()},
            activations=frozenset(state.activating | set(state.activated)),
            failed_activations=frozenset(state.failed),
        )

    def satisfied(self, key: str) -> bool:
        state = self._sets.get(key)
        return state is None or state.empty()

    def _expire(self, key: str, state: _SetExpectations, now: float) -> None:
        for table in (state.created, state.roles):
            for name in [n for n, (_, expiry) in table.items() if expiry <= now]:
                log.warning("%s: expectation for pod %s expired unobserved", key, name)
                del table[name]
        for simple in (state.deletes, state.activated):
            for name in [n for n, expiry in simple.items() if expiry <= now]:
                log.warning("%s: expectation for pod %s expired unobserved", key, name)
                del simple[name]

    # -- writes being made -------------------------------------------------------------------
    def create_sent(self, key: str, role: Role) -> None:
        sending = self._of(key).sending
        sending[role] = sending.get(role, 0) + 1

    def create_answered(
        self, key: str, role: Role, name: str | None, seen: bool, now: float
    ) -> None:
        """The create returned (`name`) or failed (None); `seen`: the cache already has it."""
        state = self._of(key)
        state.sending[role] = max(0, state.sending.get(role, 0) - 1)
        if name is not None and not seen:
            state.created[name] = (role, now + self.ttl)

    def delete_sent(self, key: str, name: str, now: float) -> None:
        self._of(key).deletes[name] = now + self.ttl

    def delete_failed(self, key: str, name: str) -> None:
        self._of(key).deletes.pop(name, None)

    def role_sent(self, key: str, name: str, role: Role, now: float) -> None:
        self._of(key).roles[name] = (role, now + self.ttl)

    def role_failed(self, key: str, name: str) -> None:
        self._of(key).roles.pop(name, None)

    def activation_started(self, key: str, name: str) -> None:
        self._of(key).activating.add(name)

    def activation_finished(self, key: str, name: str, ok: bool, now: float) -> None:
        state = self._of(key)
        state.activating.discard(name)
        if ok:
            state.activated[name] = now + self.ttl
            state.failed.pop(name, None)
        else:
            state.failed[name] = now + self.ttl

    # -- what the informer shows -------------------------------------------------------------
    def observe(self, key: str, pod: ObservedPod) -> None:
        """A pod of set `key` as the cache now has it: settle whatever it proves done."""
        state = self._sets.get(key)
        if state is None:
            return
        state.created.pop(pod.name, None)
        wanted = state.roles.get(pod.name)
        if wanted is not None and pod.role is wanted[0]:
            del state.roles[pod.name]
        if pod.deleting:
            state.deletes.pop(pod.name, None)
        if pod.waiter is not WaiterState.RUNNING:
            state.activated.pop(pod.name, None)

    def observe_gone(self, key: str, name: str) -> None:
        state = self._sets.get(key)
        if state is None:
            return
        state.created.pop(name, None)
        state.deletes.pop(name, None)
        state.roles.pop(name, None)
        state.activated.pop(name, None)
        state.failed.pop(name, None)

    def settle_against(self, key: str, cached: Collection[str]) -> None:
        """Drop expectations about pods the cache no longer has (deleted while unobserved)."""
        state = self._sets.get(key)
        if state is None:
            return
        for name in [n for n in state.deletes if n not in cached]:
            del state.deletes[name]
        for name in [n for n in state.failed if n not in cached]:
            del state.failed[name]

    def forget(self, key: str) -> None:
        self._sets.pop(key, None)
