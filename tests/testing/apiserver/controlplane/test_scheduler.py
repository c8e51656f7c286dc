"""The scheduler binds pending pods to Ready nodes, spreading them, honouring selectors."""

from __future__ import annotations

from collections import Counter

from rapproxy.testing.apiserver import EmulatedApiServer
from rapproxy.testing.apiserver.resources import PODS

from ..conftest import eventually


def _pod(name: str, **spec: object) -> dict[str, object]:
    return {
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "c", "image": "x:1"}], **spec},
    }


async def test_pending_pods_are_bound_to_ready_nodes_spread_evenly() -> None:
    async with EmulatedApiServer(nodes=["node-a", "node-b"]) as api:
        for i in range(6):
            api.registry.create(PODS, "default", _pod(f"p{i}"))

        def placements() -> Counter[str] | None:
            nodes = [(p.get("spec") or {}).get("nodeName") for p in api.store.list(PODS)]
            return Counter(nodes) if all(nodes) else None  # type: ignore[arg-type]

        placed = await eventually(placements)
        assert placed == {"node-a": 3, "node-b": 3}
        bound = api.store.get(PODS, "default", "p0")
        assert bound is not None
        scheduled = [c for c in bound["status"]["conditions"] if c["type"] == "PodScheduled"]
        assert scheduled[0]["status"] == "True"


async def test_node_selector_and_preset_node_name_are_honoured() -> None:
    async with EmulatedApiServer(nodes=["node-a", "node-b"]) as api:
        api.registry.create(
            PODS, "default", _pod("picky", nodeSelector={"kubernetes.io/hostname": "node-b"})
        )
        api.registry.create(PODS, "default", _pod("preset", nodeName="node-a"))
        api.registry.create(PODS, "default", _pod("nowhere", nodeSelector={"disk": "ssd"}))

        def node_of(name: str) -> str | None:
            pod = api.store.get(PODS, "default", name)
            return None if pod is None else pod["spec"].get("nodeName")

        assert await eventually(lambda: node_of("picky")) == "node-b"
        assert node_of("preset") == "node-a"
        await eventually(lambda: api.store.get(PODS, "default", "picky")["status"].get("podIP"))  # type: ignore[index]
        assert node_of("nowhere") is None


def _prefer(node: str, weight: int = 100) -> dict[str, object]:
    term = {"key": "metadata.name", "operator": "In", "values": [node]}
    preferred = [{"weight": weight, "preference": {"matchFields": [term]}}]
    return {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": preferred}}


async def test_preferred_node_affinity_outweighs_spreading() -> None:
    async with EmulatedApiServer(nodes=["node-a", "node-b", "node-c"]) as api:
        for i in range(3):
            api.registry.create(PODS, "default", _pod(f"to-c-{i}", affinity=_prefer("node-c")))
        api.registry.create(
            PODS, "default", _pod("mismatch", affinity=_prefer("node-missing", weight=50))
        )

        def placements() -> dict[str, str] | None:
            pods = api.store.list(PODS)
            nodes = {p["metadata"]["name"]: (p.get("spec") or {}).get("nodeName") for p in pods}
            return nodes if len(nodes) == 4 and all(nodes.values()) else None  # type: ignore[return-value]

        placed = await eventually(placements)
        assert [placed[f"to-c-{i}"] for i in range(3)] == ["node-c"] * 3
        assert placed["mismatch"] in ("node-a", "node-b")  # no match: least loaded, not node-c
