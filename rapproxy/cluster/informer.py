"""Informers: keep an in-memory copy of one resource current with list + watch.

The protocol, as client-go's reflector implements it:

1. LIST, and remember the list's `resourceVersion`;
2. WATCH from that version with bookmarks, applying each event to the store and calling the
   handler; bookmarks only advance the remembered version;
3. when the stream ends (the server's `timeoutSeconds`), watch again from the last version;
4. when the server says 410 Gone (the version fell out of its watch window — it answers with an
   `ERROR` event, or an HTTP 410), go back to 1: a re-list, *diffed against the store*, so the
   handler sees a synthetic delete for every object that vanished while we were not watching;
5. on any other error, retry with jittered exponential backoff. The store keeps serving the last
   known state all along — an API server outage never empties the proxy.

An inactivity watchdog restarts a watch that has been silent for longer than the server could
legitimately keep it silent (bookmarks arrive about once a minute), because a half-dead TCP
connection can otherwise hang a watch forever.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from rapproxy.cluster.client import ApiError, Expired, KubeClient, Resource

log = logging.getLogger(__name__)

Obj = dict[str, Any]


class InformerHandler(Protocol):
    def on_upsert(self, obj: Obj) -> None: ...
    def on_delete(self, obj: Obj) -> None: ...
    def on_synced(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Callbacks:
    """A handler built from plain functions."""

    upsert: Callable[[Obj], None]
    delete: Callable[[Obj], None]
    synced: Callable[[], None] = lambda: None

    def on_upsert(self, obj: Obj) -> None:
        self.upsert(obj)

    def on_delete(self, obj: Obj) -> None:
        self.delete(obj)

    def on_synced(self) -> None:
        self.synced()


@dataclass(frozen=True, slots=True)
class Backoff:
    initial: float = 0.8
    maximum: float = 30.0
    factor: float = 2.0
    jitter: float = 0.5

    def delay(self, attempt: int, rng: random.Random) -> float:
        base = min(self.maximum, self.initial * self.factor ** max(0, attempt - 1))
        return base * (1 + self.jitter * rng.random())


def object_key(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    namespace = meta.get("namespace")
    name = meta.get("name")
    return f"{namespace}/{name}" if namespace else str(name)


def _rv(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return str(meta.get("resourceVersion") or "")


class Informer:
    def __init__(
        self,
        client: KubeClient,
        resource: Resource,
        handler: InformerHandler,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        watch_timeout_seconds: int = 300,
        inactivity_timeout: float | None = None,
        relist_period: float = 0.0,
        backoff: Backoff | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.client = client
        self.resource = resource
        self.handler = handler
        self.namespace = namespace
        self.label_selector = label_selector
        self.field_selector = field_selector
        self.watch_timeout_seconds = watch_timeout_seconds
        # A watch with bookmarks hears from the server at least every ~60 s and when it ends.
        self.inactivity_timeout = inactivity_timeout or max(90.0, watch_timeout_seconds + 30.0)
        self.relist_period = relist_period
        self.backoff = backoff or Backoff()
        self._rng = rng or random.Random()
        self.store: dict[str, Obj] = {}
        self.resource_version = ""
        self.synced = asyncio.Event()
        self.relists = 0
        self.watch_restarts = 0
        self.last_error: str | None = None

    @property
    def name(self) -> str:
        return self.resource.plural

    async def run(self) -> None:
        """List and watch until cancelled; never returns on its own, never raises ApiError."""
        attempt = 0
        needs_list = True
        loop = asyncio.get_running_loop()
        last_list = loop.time()
        while True:
            try:
                if needs_list:
                    await self._list_and_replace()
                    needs_list = False
                    last_list = loop.time()
                    attempt = 0
                await self._watch_once()
                attempt = 0
                self.watch_restarts += 1
                if self.relist_period and loop.time() - last_list >= self.relist_period:
                    needs_list = True
            except Expired:
                log.info(
                    "%s: resourceVersion %s expired; re-listing", self.name, self.resource_version
                )
                needs_list = True
            except (ApiError, TimeoutError) as error:
                attempt += 1
                self.last_error = str(error)
                delay = self.backoff.delay(attempt, self._rng)
                log.warning(
                    "%s: %s; retrying in %.1fs (attempt %d)", self.name, error, delay, attempt
                )
                await asyncio.sleep(delay)
                # After a failed list we list again; after a failed watch, resume the watch from
                # the last version we saw (a 410 then tells us if that is too old).
                needs_list = needs_list or not self.resource_version

    async def _list_and_replace(self) -> None:
        items: list[Obj] = []
        continue_token: str | None = None
        while True:
            page = await self.client.list(
                self.resource,
                self.namespace,
                label_selector=self.label_selector,
                field_selector=self.field_selector,
                limit=500,
                continue_token=continue_token,
            )
            raw_items = page.get("items") or []
            if not isinstance(raw_items, list):
                raise ApiError(200, "BadResponse", f"{self.name} list: items is not a list")
            for item in raw_items:
                if isinstance(item, dict):
                    item.setdefault("kind", self.resource.kind)
                    item.setdefault("apiVersion", self.resource.api_version)
                    items.append(item)
            meta = page.get("metadata") or {}
            continue_token = meta.get("continue") or None
            if not continue_token:
                self.resource_version = str(meta.get("resourceVersion") or "")
                break
        self.relists += 1
        fresh = {object_key(item): item for item in items}
        for key in [k for k in self.store if k not in fresh]:
            gone = self.store.pop(key)
            self._call(self.handler.on_delete, gone)
        for key, item in fresh.items():
            previous = self.store.get(key)
            self.store[key] = item
            if previous is None or _rv(previous) != _rv(item):
                self._call(self.handler.on_upsert, item)
        if not self.synced.is_set():
            self.synced.set()
        self._call_synced()
        log.debug(
            "%s: listed %d objects at version %s", self.name, len(fresh), self.resource_version
        )

    async def _watch_once(self) -> None:
        events = self.client.watch(
            self.resource,
            self.resource_version,
            self.namespace,
            label_selector=self.label_selector,
            field_selector=self.field_selector,
            timeout_seconds=self.watch_timeout_seconds,
            read_timeout=self.inactivity_timeout,
        )
        async for event in events:
            kind = event.get("type")
            obj = event["object"]
            version = _rv(obj)
            if kind == "BOOKMARK":
                if version:
                    self.resource_version = version
                continue
            key = object_key(obj)
            if kind in ("ADDED", "MODIFIED"):
                self.store[key] = obj
                self._call(self.handler.on_upsert, obj)
            elif kind == "DELETED":
                self.store.pop(key, None)
                self._call(self.handler.on_delete, obj)
            else:
                log.warning("%s: ignoring watch event of type %r", self.name, kind)
            if version:
                self.resource_version = version

    def _call(self, callback: Callable[[Obj], None], obj: Obj) -> None:
        # A handler bug must not kill the informer (and with it every Service's updates).
        try:
            callback(obj)
        except Exception:
            log.exception("%s: handler failed for %s", self.name, object_key(obj))

    def _call_synced(self) -> None:
        try:
            self.handler.on_synced()
        except Exception:
            log.exception("%s: synced handler failed", self.name)
