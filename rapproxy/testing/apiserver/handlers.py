"""HTTP shell of the emulated API server: aiohttp routes, request decoding, watch streaming.

Owns nothing but the translation between HTTP and the `Registry`: it parses Kubernetes REST
paths (`/api/v1/namespaces/{ns}/pods/{name}/status`, `/apis/{group}/{version}/...`), query
parameters and bodies, renders results (objects, lists, server-side Tables, Status errors), and
streams watches as JSON lines with BOOKMARKs and `timeoutSeconds`. Fault injection (latency,
failing the next N requests) is a middleware here so that it hits every request alike.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from rapproxy.model import pod_columns
from rapproxy.testing.apiserver import discovery
from rapproxy.testing.apiserver.errors import (
    ApiError,
    bad_request,
    forbidden,
    internal_error,
    invalid,
    status_failure,
    too_many_requests,
)
from rapproxy.testing.apiserver.registry import (
    DeleteOptions,
    ListOptions,
    Registry,
    go_json_error,
)
from rapproxy.testing.apiserver.resources import ResourceType
from rapproxy.testing.apiserver.selectors import SelectorError, selector_predicate
from rapproxy.testing.apiserver.store import WatchEvent

JsonObject = dict[str, Any]
log = logging.getLogger(__name__)

JSON = "application/json"
DEFAULT_WATCH_TIMEOUT = 1800.0
# A few of the real server's printer columns for built-ins, so `kubectl get` is informative.
BUILTIN_COLUMNS: dict[str, list[JsonObject]] = {
    "v1/services": [
        {"name": "Type", "type": "string", "jsonPath": ".spec.type"},
        {"name": "Cluster-IP", "type": "string", "jsonPath": ".spec.clusterIP"},
    ],
    "discovery.k8s.io/v1/endpointslices": [
        {"name": "AddressType", "type": "string", "jsonPath": ".addressType"},
    ],
}
NAME_COLUMN_DESCRIPTION = (
    "Name must be unique within a namespace. Is required when creating resources, although some "
    "resources may allow a client to request the generation of an appropriate name "
    "automatically. Name is primarily intended for creation idempotence and configuration "
    "definition. Cannot be updated. More info: "
    "https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names"
)


@dataclass(slots=True)
class Faults:
    """Mutable fault-injection knobs, owned by the server object, read by the middleware."""

    latency: float = 0.0
    fail_remaining: int = 0
    fail_status: int = 500


@dataclass(frozen=True, slots=True)
class Target:
    """A parsed resource path."""

    rt: ResourceType
    namespace: str | None  # None: all namespaces (collection) / cluster-scoped
    name: str | None
    subresource: str | None


class PageNotFound(Exception):
    """A path outside every served group: plain-text 404 like the real server's mux."""


def json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=json.dumps(body, separators=(",", ":")).encode(),
        status=status,
        content_type=JSON,
        headers=headers,
    )


def error_response(err: ApiError) -> web.Response:
    headers = {"Retry-After": "1"} if err.code == 429 else None
    return json_response(err.status, err.code, headers)


def _not_found_resource() -> ApiError:
    return ApiError(
        status_failure(404, "NotFound", "the server could not find the requested resource", {})
    )


def _proto_string(field_number: int, value: bytes) -> bytes:
    return bytes([field_number << 3 | 2, len(value)]) + value


# gnostic openapi_v2.Document{swagger: "2.0", info: {title: "Kubernetes", version: "v1.28.7"}}
_OPENAPI_V2_PROTO = _proto_string(1, b"2.0") + _proto_string(
    2, _proto_string(1, b"Kubernetes") + _proto_string(2, b"v1.28.7")
)
_OPENAPI_V2_PROTO_TYPE = "application/com.github.proto-openapi.spec.v2.v1.0+protobuf"


class ApiHandlers:
    """aiohttp application speaking the Kubernetes REST + watch protocol over a Registry."""

    def __init__(
        self,
        registry: Registry,
        faults: Faults,
        *,
        bookmark_interval: float = 60.0,
        server_address: Callable[[], str] = lambda: "127.0.0.1:0",
    ) -> None:
        self.registry = registry
        self.store = registry.store
        self.faults = faults
        self.bookmark_interval = bookmark_interval
        self.server_address = server_address
        self._watch_tasks: set[asyncio.Task[Any]] = set()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024 * 1024)
        app.router.add_get("/version", self._version)
        app.router.add_get("/version/", self._version)
        app.router.add_get("/healthz", self._ok)
        app.router.add_get("/livez", self._ok)
        app.router.add_get("/readyz", self._ok)
        app.router.add_get("/openapi/v2", self._openapi_v2)
        app.router.add_get("/openapi/v3", self._openapi_v3)
        app.router.add_route("*", "/api", self._api_root)
        app.router.add_route("*", "/apis", self._apis_root)
        app.router.add_route("*", "/api/{tail:.*}", self._dispatch)
        app.router.add_route("*", "/apis/{tail:.*}", self._dispatch)
        return app

    # -- middleware -----------------------------------------------------------------------
    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if self.faults.latency > 0:
            await asyncio.sleep(self.faults.latency)
        if self.faults.fail_remaining > 0:
            self.faults.fail_remaining -= 1
            if self.faults.fail_status == 429:
                return error_response(too_many_requests())
            return error_response(
                ApiError(
                    status_failure(
                        self.faults.fail_status,
                        "InternalError",
                        "Internal error occurred: injected fault",
                        {},
                    )
                )
            )
        try:
            return await handler(request)
        except ApiError as err:
            return error_response(err)
        except PageNotFound:
            return web.Response(status=404, text="404 page not found\n", content_type="text/plain")
        except web.HTTPException:
            raise
        except Exception as exc:  # the emulator must answer, and say what broke
            log.exception("emulated apiserver failed on %s %s", request.method, request.path)
            return error_response(internal_error(f"{type(exc).__name__}: {exc}"))

    # -- discovery ------------------------------------------------------------------------
    async def _ok(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _openapi_v2(self, request: web.Request) -> web.Response:
        # An empty but valid document: kubectl apply fetches it (as protobuf) before doing
        # anything else, and falls back to its compiled-in schemas for the built-in kinds.
        if "protobuf" in request.headers.get("Accept", ""):
            return web.Response(body=_OPENAPI_V2_PROTO, content_type=_OPENAPI_V2_PROTO_TYPE)
        return json_response(
            {
                "swagger": "2.0",
                "info": {"title": "Kubernetes", "version": "v1.28.7"},
                "paths": {},
                "definitions": {},
            }
        )

    async def _openapi_v3(self, _request: web.Request) -> web.Response:
        return json_response({"paths": {}})

    async def _version(self, _request: web.Request) -> web.Response:
        return json_response(discovery.VERSION_INFO)

    async def _api_root(self, request: web.Request) -> web.Response:
        version = discovery.aggregated_version(request.headers.get("Accept", ""))
        if version:
            body = discovery.aggregated(self.store.types(), core=True, version=version)
            return _typed(body, discovery.aggregated_content_type(version))
        return json_response(discovery.api_versions(self.server_address()))

    async def _apis_root(self, request: web.Request) -> web.Response:
        version = discovery.aggregated_version(request.headers.get("Accept", ""))
        if version:
            body = discovery.aggregated(self.store.types(), core=False, version=version)
            return _typed(body, discovery.aggregated_content_type(version))
        return json_response(discovery.group_list(self.store.types()))

    # -- dispatch -------------------------------------------------------------------------
    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        parts = [p for p in request.path.split("/") if p]
        if parts[0] == "api":
            if len(parts) < 2 or parts[1] != "v1":
                raise PageNotFound
            group, version, rest = "", "v1", parts[2:]
        else:
            if len(parts) == 2:
                body = discovery.api_group(parts[1], self.store.types())
                if body is None:
                    raise PageNotFound
                return json_response(body)
            group, version, rest = parts[1], parts[2], parts[3:]
        types = [t for t in self.store.types() if t.group == group and t.version == version]
        if not types:
            raise PageNotFound
        if not rest:
            return json_response(
                discovery.resource_list(f"{group}/{version}" if group else version, types)
            )
        target = self._parse(group, version, rest)
        return await self._serve(request, target)

    def _parse(self, group: str, version: str, rest: list[str]) -> Target:
        namespace: str | None = None
        if (
            rest[0] == "namespaces"
            and len(rest) >= 3
            and self.store.lookup(group, version, rest[2]) is not None
            and not (len(rest) == 3 and rest[2] in ("status", "finalize"))
        ):
            namespace, rest = rest[1], rest[2:]
        rt = self.store.lookup(group, version, rest[0])
        if rt is None or len(rest) > 3:
            raise _not_found_resource()
        if namespace is not None and not rt.namespaced:
            raise _not_found_resource()
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        if sub is not None and sub != "status" and sub not in rt.extra_subresources:
            raise _not_found_resource()
        if sub == "status" and not rt.status_subresource:
            raise _not_found_resource()
        return Target(rt, namespace, name, sub)

    async def _serve(self, request: web.Request, t: Target) -> web.StreamResponse:
        method = request.method
        query = dict(request.query)
        ns = t.namespace or ""
        if t.rt.namespaced and t.name is not None and t.namespace is None:
            raise _not_found_resource()
        field_validation = query.get("fieldValidation", "Warn")
        if t.name is None:
            if method == "GET":
                if query.get("watch") in ("1", "true", "True"):
                    return await self._watch(request, t, query)
                return self._list(request, t, query)
            if method == "POST":
                body = await _read_json_body(request, t.rt)
                result = self.registry.create(t.rt, ns, body, field_validation=field_validation)
                return _write_response(result.body, result.code, result.warnings)
            if method == "DELETE":
                return self._delete_collection(t, query)
            raise _method_not_allowed()
        if t.subresource == "binding":
            if method != "POST":
                raise _method_not_allowed()
            body = await _read_json_body(request, t.rt)
            return json_response(self.registry.bind(ns, t.name, body), 201)
        if method == "GET":
            obj = self.registry.get(t.rt, ns, t.name)
            if _wants_table(request):
                return json_response(self._table(t.rt, [obj], obj["metadata"]["resourceVersion"]))
            return json_response(obj)
        if method == "PUT":
            body = await _read_json_body(request, t.rt)
            result = self.registry.update(
                t.rt,
                ns,
                t.name,
                body,
                subresource=t.subresource,
                field_validation=field_validation,
            )
            return _write_response(result.body, result.code, result.warnings)
        if method == "PATCH":
            raw = await request.read()
            result = self.registry.patch(
                t.rt,
                ns,
                t.name,
                request.headers.get("Content-Type", ""),
                raw,
                subresource=t.subresource,
                field_validation=field_validation,
            )
            return _write_response(result.body, result.code, result.warnings)
        if method == "DELETE":
            raw = await request.read()
            try:
                body = json.loads(raw) if raw.strip() else None
            except ValueError as exc:
                raise bad_request(f"error decoding DeleteOptions: {go_json_error(exc)}") from exc
            options = DeleteOptions.parse(body, query)
            result = self.registry.delete(t.rt, ns, t.name, options)
            return json_response(result.body, result.code)
        raise _method_not_allowed()

    def _list_options(self, query: dict[str, str]) -> ListOptions:
        limit = query.get("limit")
        return ListOptions(
            label_selector=query.get("labelSelector") or None,
            field_selector=query.get("fieldSelector") or None,
            limit=int(limit) if limit else None,
            continue_token=query.get("continue") or None,
            resource_version=query.get("resourceVersion") or None,
            resource_version_match=query.get("resourceVersionMatch") or None,
        )

    def _list(self, request: web.Request, t: Target, query: dict[str, str]) -> web.Response:
        rt = t.rt
        meta, items = self.registry.list_page(rt, t.namespace, self._list_options(query))
        if _wants_table(request):
            return json_response(self._table(rt, items, meta["resourceVersion"]))
        # Assembled from each object's cached encoding: lists of 10k objects stay cheap.
        encoded_meta = json.dumps(meta, separators=(",", ":")).encode()
        if rt.custom:
            head = f'{{"apiVersion":"{rt.api_version}","items":['.encode()
            body = head + b",".join(self.store.encode(o) for o in items)
            body += f'],"kind":"{rt.list_kind}","metadata":'.encode() + encoded_meta + b"}"
        else:
            head = f'{{"kind":"{rt.list_kind}","apiVersion":"{rt.api_version}","metadata":'.encode()
            body = head + encoded_meta + b',"items":['
            body += b",".join(self.store.encode_item(o) for o in items) + b"]}"
        return web.Response(body=body, content_type=JSON)

    def _delete_collection(self, t: Target, query: dict[str, str]) -> web.Response:
        listed = self.registry.list(t.rt, t.namespace, self._list_options(query))
        options = DeleteOptions.parse(None, query)
        for item in listed["items"]:
            meta = item["metadata"]
            try:
                self.registry.delete(t.rt, meta.get("namespace", ""), meta["name"], options)
            except ApiError:
                continue
        listed["metadata"].pop("continue", None)
        return json_response(listed)

    # -- tables ---------------------------------------------------------------------------
    def _table(self, rt: ResourceType, items: list[JsonObject], rv: str) -> JsonObject:
        if rt.key == "v1/pods":
            return _pod_table(items, rv)
        columns = [
            {
                "name": "Name",
                "type": "string",
                "format": "name",
                "description": NAME_COLUMN_DESCRIPTION,
                "priority": 0,
            }
        ]
        custom = self.registry.columns(rt) or BUILTIN_COLUMNS.get(rt.key, [])
        for col in custom:
            columns.append(
                {
                    "name": col["name"],
                    "type": col.get("type", "string"),
                    "format": "",
                    "description": "Custom resource definition column (in JSONPath format): "
                    + col["jsonPath"],
                    "priority": int(col.get("priority", 0)),
                }
            )
        if not any(c.get("jsonPath") == ".metadata.creationTimestamp" for c in custom):
            columns.append(
                {
                    "name": "Age",
                    "type": "date",
                    "format": "",
                    "description": "Time since creation",
                    "priority": 0,
                }
            )
        rows = []
        for item in items:
            meta = item.get("metadata") or {}
            cells: list[Any] = [meta.get("name")]
            for col in custom:
                value = _json_path(item, col["jsonPath"])
                if col.get("type") == "date" and isinstance(value, str):
                    value = _age(value)
                cells.append(value)
            if not any(c.get("jsonPath") == ".metadata.creationTimestamp" for c in custom):
                cells.append(_age(meta.get("creationTimestamp") or ""))
            partial = {k: v for k, v in meta.items() if k != "managedFields"}
            rows.append(
                {
                    "cells": cells,
                    "object": {
                        "kind": "PartialObjectMetadata",
                        "apiVersion": "meta.k8s.io/v1",
                        "metadata": partial,
                    },
                }
            )
        return {
            "kind": "Table",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": {"resourceVersion": rv},
            "columnDefinitions": columns,
            "rows": rows,
        }

    # -- watch ----------------------------------------------------------------------------
    async def _watch(
        self, request: web.Request, t: Target, query: dict[str, str]
    ) -> web.StreamResponse:
        rt = t.rt
        try:
            accepts = selector_predicate(
                query.get("labelSelector") or None,
                query.get("fieldSelector") or None,
                rt.field_selectors,
            )
        except SelectorError as exc:
            raise bad_request(str(exc)) from exc
        if "sendInitialEvents" in query:
            # Streaming lists (WatchList) are alpha and off by default in v1.28: its server
            # refuses the parameter, and clients (kubectl >= 1.33's `--wait`, client-go's
            # reflector) fall back to list+watch. Accepting it silently without ever sending the
            # initial-events-end bookmark would leave them waiting for it.
            causes = []
            if query.get("resourceVersionMatch") != "NotOlderThan":
                causes.append(
                    forbidden(
                        "resourceVersionMatch",
                        "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
                    )
                )
            causes.append(
                forbidden(
                    "sendInitialEvents",
                    "sendInitialEvents is forbidden for watch unless the WatchList feature gate "
                    "is enabled",
                )
            )
            raise invalid("ListOptions", "meta.k8s.io", "", causes)
        rv_text = query.get("resourceVersion") or ""
        since = int(rv_text) if rv_text else None
        timeout = float(query.get("timeoutSeconds") or DEFAULT_WATCH_TIMEOUT)
        bookmarks = query.get("allowWatchBookmarks") in ("1", "true", "True") and rv_text != ""
        response = web.StreamResponse(status=200, headers={"Content-Type": JSON})
        try:
            sub, replay = self.store.subscribe(rt, since, accepts, t.namespace)
        except ApiError as err:
            await response.prepare(request)
            await _write_event(response, "ERROR", err.status)
            await response.write_eof()
            return response
        try:
            await response.prepare(request)
            start = time.monotonic()
            deadline = start + timeout
            baseline = max([since or 0] + [e.resource_version for e in replay])
            for replayed in replay:
                await self._write_watch_event(response, replayed)
            next_bookmark = self._next_bookmark(start, start, deadline)
            while True:
                now = time.monotonic()
                if now >= deadline:
                    break
                wake = min(deadline, next_bookmark) if bookmarks else deadline
                event: WatchEvent | None
                try:
                    event = await asyncio.wait_for(sub.queue.get(), max(0.0, wake - now))
                except TimeoutError:
                    if bookmarks and time.monotonic() >= next_bookmark:
                        latest = self.store.latest_revision(rt)
                        if latest > baseline:
                            await _write_event(response, "BOOKMARK", rt.empty_object(str(latest)))
                        next_bookmark = self._next_bookmark(
                            start, time.monotonic() + 0.001, deadline
                        )
                    continue
                if event is None:
                    break  # the server dropped this watch
                await self._write_watch_event(response, event)
            await response.write_eof()
        except ConnectionError:
            log.debug("watch client went away")  # nothing to tell it any more
        finally:
            self.store.unsubscribe(sub)
        return response

    async def _write_watch_event(self, response: web.StreamResponse, event: WatchEvent) -> None:
        encoded = self.store.encode(event.object)
        await response.write(b'{"type":"' + event.type.encode() + b'","object":' + encoded + b"}\n")

    def _next_bookmark(self, start: float, after: float, deadline: float) -> float:
        """Bookmarks every `bookmark_interval` and once about 2 s before the timeout."""
        periodic = start + self.bookmark_interval
        while periodic <= after:
            periodic += self.bookmark_interval
        final = max(start, deadline - 2.0)
        candidates = [c for c in (periodic, final) if c >= after]
        return min(candidates) if candidates else deadline + 1.0


async def _write_event(response: web.StreamResponse, kind: str, obj: JsonObject) -> None:
    line = json.dumps({"type": kind, "object": obj}, separators=(",", ":"))
    await response.write(line.encode() + b"\n")


def _typed(body: JsonObject, content_type: str) -> web.Response:
    return web.Response(body=json.dumps(body).encode(), headers={"Content-Type": content_type})


def _write_response(body: JsonObject, code: int, warnings: list[str]) -> web.Response:
    headers = None
    if warnings:
        headers = {"Warning": ", ".join(f'299 - "{_escape(w)}"' for w in warnings)}
    return json_response(body, code, headers)


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _method_not_allowed() -> ApiError:
    return ApiError(
        status_failure(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
            {},
        )
    )


async def _read_json_body(request: web.Request, rt: ResourceType) -> Any:
    raw = await request.read()
    try:
        return json.loads(raw)
    except ValueError as exc:
        text = raw.decode(errors="replace")
        raise bad_request(
            f"the object provided is unrecognized (must be of type {rt.kind}): couldn't get "
            f"version/kind; json parse error: {go_json_error(exc)} ({text})"
        ) from exc


def _wants_table(request: web.Request) -> bool:
    accept = request.headers.get("Accept", "")
    return "as=Table" in accept.split(",")[0]


def _json_path(obj: JsonObject, path: str) -> Any:
    node: Any = obj
    for part in path.strip(".").split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def _age(timestamp: str) -> str:
    try:
        created = time.mktime(time.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    except ValueError:
        return "<unknown>"
    seconds = max(0, int(time.time() - created))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


# kube-apiserver v1.28 prints pods itself (pkg/printers/internalversion): these columns, the
# STATUS and READY cells by kubectl's printPod rules, `<none>` for what a pod does not have.
POD_COLUMNS: tuple[tuple[str, int, str], ...] = (
    ("Name", 0, NAME_COLUMN_DESCRIPTION),
    ("Ready", 0, "The aggregate readiness state of this pod for accepting traffic."),
    ("Status", 0, "The aggregate status of the containers in this pod."),
    (
        "Restarts",
        0,
        "The number of times the containers in this pod have been restarted and when the last "
        "container in this pod has restarted.",
    ),
    (
        "Age",
        0,
        "CreationTimestamp is a timestamp representing the server time when this object "
        "was created.",
    ),
    ("IP", 1, "podIP address allocated to the pod. Routable at least within the cluster."),
    ("Node", 1, "NodeName indicates in which node this pod is scheduled."),
    (
        "Nominated Node",
        1,
        "nominatedNodeName is set when this pod preempts other pods on the node.",
    ),
    (
        "Readiness Gates",
        1,
        "If specified, all readiness gates will be evaluated for pod readiness.",
    ),
)


def _pod_table(items: list[JsonObject], rv: str) -> JsonObject:
    rows = []
    for pod in items:
        meta = pod.get("metadata") or {}
        spec = pod.get("spec") or {}
        status = pod.get("status") or {}
        gates = spec.get("readinessGates") or []
        if gates:
            met = {
                c.get("type") for c in status.get("conditions") or [] if c.get("status") == "True"
            }
            ready_gates = sum(1 for g in gates if g.get("conditionType") in met)
            gates_cell = f"{ready_gates}/{len(gates)}"
        else:
            gates_cell = "<none>"
        cells: list[Any] = [
            meta.get("name"),
            pod_columns.ready_column(pod),
            pod_columns.status_column(pod),
            str(pod_columns.restarts(pod)),
            _age(meta.get("creationTimestamp") or ""),
            status.get("podIP") or "<none>",
            spec.get("nodeName") or "<none>",
            status.get("nominatedNodeName") or "<none>",
            gates_cell,
        ]
        partial = {k: v for k, v in meta.items() if k != "managedFields"}
        rows.append(
            {
                "cells": cells,
                "object": {
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": partial,
                },
            }
        )
    columns = [
        {
            "name": name,
            "type": "string",
            "format": "name" if name == "Name" else "",
            "description": description,
            "priority": priority,
        }
        for name, priority, description in POD_COLUMNS
    ]
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": rv},
        "columnDefinitions": columns,
        "rows": rows,
    }
