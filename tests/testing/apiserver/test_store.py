"""The store: one global revision, bounded watch history, exact lists, subscriptions."""

from __future__ import annotations

import pytest

from rapproxy.testing.apiserver.errors import ApiError
from rapproxy.testing.apiserver.resources import CONFIGMAPS, SECRETS
from rapproxy.testing.apiserver.store import Store


def _cm(name: str, **labels: str) -> dict[str, object]:
    return {
        "kind": "ConfigMap",
        "apiVersion": "v1",
        "metadata": {"name": name, "namespace": "ns", "uid": name, "labels": labels},
    }


def test_revisions_are_global_and_increasing_across_resources() -> None:
    store = Store()
    a = store.persist(CONFIGMAPS, _cm("a"))
    s = store.persist(SECRETS, {"kind": "Secret", "metadata": {"name": "s", "namespace": "ns"}})
    gone = store.remove(CONFIGMAPS, "ns", "a")
    revisions = [int(o["metadata"]["resourceVersion"]) for o in (a, s, gone)]
    assert revisions == sorted(revisions) and len(set(revisions)) == 3


async def test_watch_replays_history_and_expires_beyond_the_window() -> None:
    store = Store(history_size=3)
    first = int(store.persist(CONFIGMAPS, _cm("a"))["metadata"]["resourceVersion"])
    for name in "bcd":
        store.persist(CONFIGMAPS, _cm(name))
    with pytest.raises(ApiError) as raised:
        store.subscribe(CONFIGMAPS, first - 1)
    assert raised.value.code == 410
    assert raised.value.status["message"] == f"too old resource version: {first - 1} ({first})"
    _, replay = store.subscribe(CONFIGMAPS, first)
    assert [e.object["metadata"]["name"] for e in replay] == ["b", "c", "d"]


async def test_selector_watch_sees_objects_leaving_as_deleted_and_entering_as_added() -> None:
    store = Store()
    store.persist(CONFIGMAPS, _cm("a", app="web"))
    sub, _ = store.subscribe(
        CONFIGMAPS, store.revision, lambda o: o["metadata"].get("labels", {}).get("app") == "web"
    )
    store.persist(CONFIGMAPS, _cm("a", app="db"))
    store.persist(CONFIGMAPS, _cm("a", app="web"))
    kinds = [sub.queue.get_nowait().type for _ in range(2)]  # type: ignore[union-attr]
    assert kinds == ["DELETED", "ADDED"]


def test_exact_list_reconstructs_past_state_until_compaction() -> None:
    store = Store()
    store.persist(CONFIGMAPS, _cm("a"))
    at = store.revision
    store.persist(CONFIGMAPS, _cm("b"))
    store.remove(CONFIGMAPS, "ns", "a")
    assert [o["metadata"]["name"] for o in store.list_at(CONFIGMAPS, "ns", at)] == ["a"]
    store.compact()
    with pytest.raises(ApiError) as raised:
        store.list_at(CONFIGMAPS, "ns", at)
    assert raised.value.code == 410
