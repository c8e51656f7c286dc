"""The BPS controller end to end: emulated API server + control plane + real kubernetes-asyncio.

Cold backups wait in a real `bps-wait` server on loopback (the kubelets' `StandInRuntime`),
so every conversion of a cold backup here is a real authenticated activation over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from bpsctl import render
from rapproxy.bps.controller import BpsController
from rapproxy.bps.status import rfc3339
from rapproxy.bps.testbed import BpsTestbed, set_manifest, wait_for
from rapproxy.cluster.client import BACKUP_POD_SETS, EVENTS, PODS, KubeClient
from rapproxy.config import BpsSettings
from rapproxy.model.bps import LABEL_ROLE
from rapproxy.testing.apiserver import ResourceType, WatchEvent
from rapproxy.testing.apiserver.resources import EVENTS as SERVER_EVENTS
from rapproxy.testing.apiserver.resources import NODES as SERVER_NODES
from rapproxy.testing.apiserver.resources import PODS as SERVER_PODS

pytestmark = pytest.mark.timeout(60)
SETTLE = 15.0
CLUSTER_ROLES = Path(__file__).resolve().parents[2] / "manifests" / "base" / "clusterrole.yaml"


@dataclass
class Rig:
    bed: BpsTestbed
    client: KubeClient
    controller: BpsController

    def settled(self, name: str, replicas: int, hot: int, cold: int) -> bool:
        return self.bed.settled(name, replicas, hot, cold) and self.bed.cache_current(
            self.controller
        )

    def status(self, name: str) -> dict[str, Any]:
        obj = self.bed.get_set(name)
        assert obj is not None
        status: dict[str, Any] = obj.get("status") or {}
        return status

    def reported_converged(self, name: str, generation: int) -> bool:
        progressing = self.condition(name, "Progressing")
        return (
            progressing is not None
            and progressing["reason"] == "Converged"
            and self.status(name).get("observedGeneration") == generation
        )

    def condition(self, name: str, kind: str) -> dict[str, Any] | None:
        for c in self.status(name).get("conditions") or []:
            if c["type"] == kind:
                return dict(c)
        return None


@contextlib.asynccontextmanager
async def running(
    bed: BpsTestbed, settings: BpsSettings | None = None
) -> AsyncIterator[tuple[KubeClient, BpsController]]:
    client = await bed.client()
    controller = bed.controller(client, settings)
    task = asyncio.create_task(controller.run())
    try:
        await asyncio.wait_for(controller.ready.wait(), 10)
        yield client, controller
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    async with BpsTestbed() as bed, running(bed) as (client, controller):
        yield Rig(bed, client, controller)


async def converge(rig: Rig, name: str, replicas: int, hot: int, cold: int) -> None:
    await wait_for(lambda: rig.settled(name, replicas, hot, cold), SETTLE)


def uids(bed: BpsTestbed, name: str) -> dict[str, str]:
    return {p["metadata"]["name"]: p["metadata"]["uid"] for p in bed.pods(name)}


async def test_creates_2_2_2_and_converges_with_owned_labelled_pods(rig: Rig) -> None:
    created = await rig.bed.create_set(rig.client, set_manifest("web", 2, 2, 2))
    await converge(rig, "web", 2, 2, 2)

    pods = rig.bed.pods("web")
    assert len(pods) == 6
    for pod in pods:
        meta = pod["metadata"]
        assert meta["generateName"] == "web-"
        assert meta["labels"]["app"] == "web"  # the template's labels survive
        (owner,) = meta["ownerReferences"]
        assert owner["uid"] == created["metadata"]["uid"]
        assert owner["controller"] is True
    await wait_for(lambda: rig.reported_converged("web", 1), SETTLE)
    status = rig.status("web")
    assert status["observedGeneration"] == 1
    assert (status["replicas"], status["hotBackups"], status["coldBackups"]) == (2, 2, 2)
    assert sorted(status["pods"]["coldBackup"]) == rig.bed.roles("web")["cold-backup"]
    available = rig.condition("web", "Available")
    assert available is not None and available["status"] == "True"


async def test_update_to_3_3_3_makes_exactly_the_papers_conversions(rig: Rig) -> None:
    await rig.bed.create_set(rig.client, set_manifest("web", 2, 2, 2))
    await converge(rig, "web", 2, 2, 2)
    before = rig.bed.roles("web")
    before_uids = uids(rig.bed, "web")

    await rig.client.patch(
        BACKUP_POD_SETS,
        "web",
        {"spec": {"replicas": 3, "hotBackups": 3, "coldBackups": 3}},
        "default",
    )
    await converge(rig, "web", 3, 3, 3)
    after = rig.bed.roles("web")

    # Nothing was deleted or restarted: every old pod is still there, same uid.
    now_uids = uids(rig.bed, "web")
    assert all(now_uids.get(name) == uid for name, uid in before_uids.items())
    promoted = set(after["primary"]) - set(before["primary"])
    assert len(promoted) == 1 and promoted <= set(before["hot-backup"])
    assert set(before["cold-backup"]) <= set(after["hot-backup"])  # both cold → hot
    new = set(now_uids) - set(before_uids)
    assert len(new) == 3 and new == set(after["cold-backup"])
    # The two conversions were real activations of the waiting bps-wait servers.
    activated = {uid for uid in rig.bed.runtime.activated}
    assert {before_uids[n] for n in before["cold-backup"]} == activated
    await wait_for(lambda: rig.reported_converged("web", 2), SETTLE)


async def test_deleted_primary_promotes_hot_activates_cold_and_creates_cold(rig: Rig) -> None:
    await rig.bed.create_set(rig.client, set_manifest("web", 2, 2, 2))
    await converge(rig, "web", 2, 2, 2)
    before = rig.bed.roles("web")
    victim = before["primary"][0]

    await rig.client.delete(PODS, victim, "default")
    await wait_for(
        lambda: victim not in uids(rig.bed, "web") and rig.settled("web", 2, 2, 2), SETTLE
    )
    after = rig.bed.roles("web")

    assert len(set(after["primary"]) & set(before["hot-backup"])) == 1
    assert len(set(after["hot-backup"]) & set(before["cold-backup"])) == 1
    new_cold = set(after["cold-backup"]) - set(before["cold-backup"])
    assert len(new_cold) == 1
    await wait_for(lambda: "restoredAt" in rig.status("web").get("lastFailover", {}), SETTLE)
    failover = rig.status("web")["lastFailover"]
    assert failover["failedPod"] == victim
    assert failover["promotedPod"] in before["hot-backup"]
    durations = failover["durations"]
    assert set(durations) == {"promoted", "activated", "replacementCreated", "restored"}
    assert 0 <= durations["promoted"] <= durations["restored"]
    assert 0 < failover["handlingSeconds"] < 5
    registry = rig.controller.metrics.registry
    assert registry.get_sample_value("rapproxy_bps_failovers_total", {"reason": "terminating"}) == 1
    assert registry.get_sample_value("rapproxy_bps_activations_total", {"outcome": "activated"})
    assert registry.get_sample_value("rapproxy_bps_handling_duration_seconds_count")
    restored = {"stage": "restored"}
    assert registry.get_sample_value("rapproxy_bps_failover_stage_seconds_count", restored) == 1


async def test_scale_down_removes_the_least_valuable_pods_first(rig: Rig) -> None:
    await rig.bed.create_set(rig.client, set_manifest("web", 3, 1, 1))
    await converge(rig, "web", 3, 1, 1)
    laggard = rig.bed.roles("web")["primary"][1]

    def not_ready(pod: dict[str, Any]) -> None:
        for c in pod["status"]["conditions"]:
            if c["type"] == "Ready":
                c["status"] = "False"

    rig.bed.api.registry.mutate(SERVER_PODS, "default", laggard, not_ready, subresource="status")
    await wait_for(lambda: rig.bed.cache_current(rig.controller), SETTLE)
    before = uids(rig.bed, "web")

    await rig.client.patch(BACKUP_POD_SETS, "web", {"spec": {"replicas": 2}}, "default")
    await wait_for(lambda: laggard not in uids(rig.bed, "web"), SETTLE)
    await converge(rig, "web", 2, 1, 1)
    assert set(before) - set(uids(rig.bed, "web")) == {laggard}


async def test_invalid_spec_sets_a_condition_naming_the_field_and_nothing_crashes(
    rig: Rig,
) -> None:
    bad = set_manifest("bad", 1, 0, 0)
    bad["spec"]["template"]["metadata"]["labels"][LABEL_ROLE] = "primary"
    await rig.bed.create_set(rig.client, bad)

    def flagged() -> bool:
        c = rig.condition("bad", "InvalidSpec")
        return c is not None and c["status"] == "True"

    await wait_for(flagged, SETTLE)
    condition = rig.condition("bad", "InvalidSpec")
    assert condition is not None
    assert f"spec.template.metadata.labels.{LABEL_ROLE}" in condition["message"]
    assert rig.bed.pods("bad") == []

    # The controller still works, for other sets and for this one once it is fixed.
    await rig.bed.create_set(rig.client, set_manifest("good", 1, 1, 1))
    await converge(rig, "good", 1, 1, 1)
    await rig.client.patch(
        BACKUP_POD_SETS,
        "bad",
        {"spec": {"template": {"metadata": {"labels": {LABEL_ROLE: None}}}}},
        "default",
    )
    await converge(rig, "bad", 1, 0, 0)
    await wait_for(lambda: not flagged(), SETTLE)

    def warning_posted() -> bool:
        return any(
            e.get("reason") == "InvalidSpec" and e["involvedObject"]["name"] == "bad"
            for e in rig.bed.api.store.list(SERVER_EVENTS, "default")
        )

    await wait_for(warning_posted, SETTLE)


async def test_converges_through_500s_dropped_watches_and_410_mid_reconcile(rig: Rig) -> None:
    api = rig.bed.api
    created: list[str] = []

    def count_creates(rt: ResourceType, event: WatchEvent) -> None:
        if rt is SERVER_PODS and event.type == "ADDED":
            created.append(event.object["metadata"]["name"])

    api.store.add_listener(count_creates)
    await rig.bed.create_set(rig.client, set_manifest("web", 2, 2, 2))
    api.fail_next(6, 500)  # the controller's first writes fail
    for _ in range(3):
        api.drop_watches()
        api.compact()  # the informers' next watch gets 410 and must re-list
        api.fail_next(3, 500)
        await asyncio.sleep(0.02)  # pacing: spread the faults over the convergence, not a sync
    await converge(rig, "web", 2, 2, 2)

    victim = rig.bed.roles("web")["primary"][0]
    await rig.client.delete(PODS, victim, "default")
    api.fail_next(4, 500)
    api.drop_watches()
    api.compact()
    await wait_for(
        lambda: victim not in uids(rig.bed, "web") and rig.settled("web", 2, 2, 2), SETTLE
    )
    assert rig.controller.pods.relists >= 2
    # Six pods, then exactly one replacement: a cache that lagged behind the controller's own
    # writes (re-lists, lost watches) never made it create twice.
    assert len(created) == 7
    api.store.remove_listener(count_creates)


async def test_writes_go_only_through_the_granted_verbs(rig: Rig) -> None:
    # Granted: what manifests/base/clusterrole.yaml gives the controller's own ClusterRole, which is
    # all `rapproxy bps-controller` run alone has (its Lease comes from a separate Role). That the
    # rules hold no more than the code uses: tests/integration/test_rbac.py.
    (role,) = (
        doc
        for doc in yaml.safe_load_all(CLUSTER_ROLES.read_text())
        if doc and doc["metadata"]["name"] == "rapproxy-bps-controller"
    )
    granted = {
        (verb, group, resource)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    operator = await rig.bed.client()  # the test's own writes stay out of the controller's count
    await rig.bed.create_set(operator, set_manifest("web", 1, 1, 1))
    await converge(rig, "web", 1, 1, 1)
    await operator.delete(PODS, rig.bed.roles("web")["primary"][0], "default")
    await converge(rig, "web", 1, 1, 1)
    await rig.controller.events.flush()
    assert set(rig.client.calls) - granted == set()
    assert rig.client.calls[("create", "", EVENTS.plural)] > 0


async def test_a_cold_backup_that_cannot_be_activated_is_replaced() -> None:
    async with BpsTestbed() as bed:
        client = await bed.client()
        broken: set[str] = set()

        def target(bps: Any, pod: Any) -> tuple[str, int] | None:
            if pod.uid in broken:
                return ("127.0.0.1", 9)  # discard port: nothing listens, activation is refused
            return bed.runtime.target(bps, pod)

        controller = BpsController(
            client,
            BpsSettings(activation_timeout=0.3),
            activation_target=target,
        )
        task = asyncio.create_task(controller.run())
        try:
            await bed.create_set(client, set_manifest("web", 1, 0, 1))
            await wait_for(lambda: bed.settled("web", 1, 0, 1), SETTLE)
            cold = bed.roles("web")["cold-backup"][0]
            broken.add(uids(bed, "web")[cold])
            await client.patch(
                BACKUP_POD_SETS, "web", {"spec": {"hotBackups": 1, "coldBackups": 0}}, "default"
            )
            await wait_for(lambda: cold not in uids(bed, "web"), SETTLE)
            await wait_for(lambda: bed.settled("web", 1, 1, 0), SETTLE)
            await controller.events.flush()
            reasons = {e["reason"] for e in bed.api.store.list(SERVER_EVENTS, "default")}
            assert "ActivationFailed" in reasons
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_primaries_on_a_node_gone_not_ready_are_replaced_from_other_nodes(rig: Rig) -> None:
    await rig.bed.create_set(rig.client, set_manifest("web", 2, 1, 1))
    await converge(rig, "web", 2, 1, 1)
    pods = {p["metadata"]["name"]: p for p in rig.bed.pods("web")}
    victim = rig.bed.roles("web")["primary"][0]
    node = pods[victim]["spec"]["nodeName"]

    def not_ready(obj: dict[str, Any]) -> None:
        for c in obj["status"]["conditions"]:
            if c["type"] == "Ready":
                c["status"] = "False"

    rig.bed.api.registry.mutate(SERVER_NODES, "", node, not_ready, subresource="status")

    def replaced() -> bool:
        live = [p for p in rig.bed.pods("web") if not p["metadata"].get("deletionTimestamp")]
        on_node = [p for p in live if p["spec"].get("nodeName") == node]
        return not on_node and rig.settled("web", 2, 1, 1)

    await wait_for(replaced, SETTLE)
    await wait_for(lambda: "restoredAt" in rig.status("web").get("lastFailover", {}), SETTLE)
    assert rig.status("web")["lastFailover"]["reason"] == "node-not-ready"


async def test_a_primary_not_ready_past_the_grace_is_replaced() -> None:
    async with BpsTestbed() as bed, running(bed, BpsSettings(ready_grace=1.5)) as (client, ctl):
        rig = Rig(bed, client, ctl)
        await bed.create_set(client, set_manifest("web", 1, 1, 0))
        await converge(rig, "web", 1, 1, 0)
        victim = bed.roles("web")["primary"][0]
        hot = bed.roles("web")["hot-backup"][0]

        def not_ready(pod: dict[str, Any]) -> None:
            for c in pod["status"]["conditions"]:
                if c["type"] == "Ready":
                    c["status"] = "False"
                    c["lastTransitionTime"] = rfc3339(time.time())

        bed.api.registry.mutate(SERVER_PODS, "default", victim, not_ready, subresource="status")
        took = await wait_for(lambda: bed.roles("web")["primary"] == [hot], SETTLE)
        # Not before the grace; the API's timestamps have whole seconds, so up to 1 s less.
        assert took >= 0.45
        await wait_for(
            lambda: victim not in uids(bed, "web") and rig.settled("web", 1, 1, 0), SETTLE
        )


COLD_TO_HOT_WITHIN = 3.0  # seconds from the spec change to the activated pod Ready as a hot backup


async def test_a_cold_backup_stays_not_ready_until_the_controller_activates_it(rig: Rig) -> None:
    await rig.bed.create_set(rig.client, set_manifest("web", 1, 0, 1))
    await converge(rig, "web", 1, 0, 1)
    (cold,) = rig.bed.roles("web")["cold-backup"]
    uid = uids(rig.bed, "web")[cold]

    def pod() -> dict[str, Any]:
        (found,) = [p for p in rig.bed.pods("web") if p["metadata"]["name"] == cold]
        return found

    # The controller runs and sees it, yet the cold backup stays cold: held by its waiter.
    loop = asyncio.get_running_loop()
    until = loop.time() + 0.5
    while loop.time() < until:
        now = pod()
        assert now["status"]["phase"] == "Pending"
        assert render.pod_status(now) == "Init:0/1" and render.pod_ready_count(now) == "0/1"
        assert not render.pod_ready(now)
        await asyncio.sleep(0.02)
    assert uid not in rig.bed.runtime.activated

    started = time.monotonic()
    await rig.client.patch(
        BACKUP_POD_SETS, "web", {"spec": {"hotBackups": 1, "coldBackups": 0}}, "default"
    )

    def hot_and_ready() -> bool:
        now = pod()
        return (
            now["metadata"]["labels"][LABEL_ROLE] == "hot-backup"
            and render.pod_status(now) == "Running"
            and render.pod_ready(now)
        )

    took = await wait_for(hot_and_ready, COLD_TO_HOT_WITHIN)
    assert took < COLD_TO_HOT_WITHIN
    assert uid in rig.bed.runtime.activated  # by a real POST /activate, not by the kubelet
    assert time.monotonic() - started < COLD_TO_HOT_WITHIN
    await converge(rig, "web", 1, 1, 0)
