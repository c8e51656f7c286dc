"""Garbage collection: dangling dependents, orphaning, nested foreground deletion."""

from __future__ import annotations

from typing import Any

from rapproxy.testing.apiserver import EmulatedApiServer
from rapproxy.testing.apiserver.registry import DeleteOptions
from rapproxy.testing.apiserver.resources import CONFIGMAPS

from .conftest import eventually


def _owned(
    name: str, owner: dict[str, Any] | None = None, uid: str | None = None
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if owner is not None or uid is not None:
        meta["ownerReferences"] = [
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "name": owner["metadata"]["name"] if owner else "ghost",
                "uid": uid or owner["metadata"]["uid"],  # type: ignore[index]
                "blockOwnerDeletion": True,
            }
        ]
    return {"metadata": meta}


def _exists(api: EmulatedApiServer, name: str) -> bool:
    return api.store.get(CONFIGMAPS, "default", name) is not None


async def test_dependent_of_a_nonexistent_owner_is_deleted() -> None:
    async with EmulatedApiServer() as api:
        api.registry.create(CONFIGMAPS, "default", _owned("dangling", uid="no-such-uid"))
        await eventually(lambda: not _exists(api, "dangling"))


async def test_orphan_deletion_strips_owner_references_and_keeps_dependents() -> None:
    async with EmulatedApiServer() as api:
        owner = api.registry.create(CONFIGMAPS, "default", _owned("owner")).body
        api.registry.create(CONFIGMAPS, "default", _owned("dep", owner))
        kept = api.registry.delete(
            CONFIGMAPS, "default", "owner", DeleteOptions(propagation_policy="Orphan")
        ).body
        assert kept["metadata"]["finalizers"] == ["orphan"]
        await eventually(lambda: not _exists(api, "owner"))
        dep = api.store.get(CONFIGMAPS, "default", "dep")
        assert dep is not None and "ownerReferences" not in dep["metadata"]


async def test_foreground_deletion_waits_for_a_chain_of_dependents() -> None:
    async with EmulatedApiServer() as api:
        top = api.registry.create(CONFIGMAPS, "default", _owned("top")).body
        mid = api.registry.create(CONFIGMAPS, "default", _owned("mid", top)).body
        api.registry.create(CONFIGMAPS, "default", _owned("leaf", mid))
        api.registry.delete(
            CONFIGMAPS, "default", "top", DeleteOptions(propagation_policy="Foreground")
        )
        assert _exists(api, "top")
        await eventually(lambda: not any(_exists(api, n) for n in ("top", "mid", "leaf")))
