"""The one door to the Kubernetes API: raw JSON over kubernetes-asyncio's authenticated client.

Why raw JSON and not the generated models: the proxy parses objects into its own frozen model at
the edge anyway, a watch of 10,000 Services should not build 10,000 model trees first, and custom
resources have no generated models at all. kubernetes-asyncio still does what it is good at —
kubeconfig and in-cluster config, TLS, token refresh — through `ApiClient.call_api` with
`_preload_content=False`, which hands back the aiohttp response.

Every request goes through `KubeClient._request`, which records `(verb, group, resource)`.
That record is the ground truth the RBAC test compares the ClusterRole against: the permissions
are derived from the calls the code really makes, not from a hand-kept list.

Errors become `ApiError` subclasses carrying the server's `Status` (reason, message, code), so
callers branch on `Conflict`, `NotFound`, `Expired` rather than on numbers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import yaml
from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.client.exceptions import ApiException

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Resource:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(
        self, namespace: str | None = None, name: str | None = None, subresource: str | None = None
    ) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if namespace is not None and self.namespaced:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name is not None:
            base += f"/{name}"
            if subresource:
                base += f"/{subresource}"
        return base


SERVICES = Resource("", "v1", "services", "Service", True)
ENDPOINT_SLICES = Resource("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", True)
NODES = Resource("", "v1", "nodes", "Node", False)
PODS = Resource("", "v1", "pods", "Pod", True)
EVENTS = Resource("", "v1", "events", "Event", True)
LEASES = Resource("coordination.k8s.io", "v1", "leases", "Lease", True)
BACKUP_POD_SETS = Resource("rapproxy.io", "v1alpha1", "backuppodsets", "BackupPodSet", True)

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"


class ApiError(Exception):
    """A request the API server refused or could not answer; `status` is its Status object."""

    def __init__(
        self, code: int, reason: str, message: str, status: Mapping[str, Any] | None = None
    ):
        self.code = code
        self.reason = reason
        self.message = message
        self.status = dict(status or {})
        super().__init__(f"{code} {reason}: {message}")


class NotFound(ApiError):
    pass


class Conflict(ApiError):
    """409: stale resourceVersion or AlreadyExists (see `reason`)."""


class Expired(ApiError):
    """410 Gone: the resourceVersion is older than the server keeps; re-list."""


class Unavailable(ApiError):
    """The server could not be reached, timed out, or answered 5xx/429: retry later."""


def _error_for(code: int, body: bytes) -> ApiError:
    try:
        status = json.loads(body)
    except ValueError:
        status = None
    if not isinstance(status, dict):
        status = {"message": body.decode("utf-8", "replace")[:500]}
    reason = str(status.get("reason") or "")
    message = str(status.get("message") or "")
    if code == 404:
        return NotFound(code, reason or "NotFound", message, status)
    if code == 409:
        return Conflict(code, reason or "Conflict", message, status)
    if code == 410:
        return Expired(code, reason or "Expired", message, status)
    if code == 429 or code >= 500:
        return Unavailable(code, reason or "Unavailable", message, status)
    return ApiError(code, reason or "Error", message, status)


@dataclass(frozen=True, slots=True)
class ClientSettings:
    kubeconfig: str = ""
    context: str = ""
    request_timeout: float = 30.0


def kubeconfig_files(explicit: str, environ: Mapping[str, str]) -> tuple[str, ...]:
    """The kubeconfig files to load, in kubectl's order; empty means in-cluster config.

    A path given explicitly (`--kubeconfig`, `RAPPROXY_CLIENT_CONNECTION_KUBECONFIG` or
    `clientConnection.kubeconfig`) wins and is used as given. Otherwise `$KUBECONFIG`, a list
    separated by `os.pathsep`: like kubectl (client-go) and kubernetes-asyncio, every listed file
    that exists is used and merged (see `_load_kubeconfig`); missing ones are skipped, `~` is
    expanded as kubernetes-asyncio does. When none exists, in-cluster config follows, as kubectl
    falls back to it. Unlike kubectl there is no `~/.kube/config` fallback: this is a daemon,
    and a stray file in root's home must not silently redirect a node proxy away from the
    cluster it runs in.
    """
    if explicit:
        return (explicit,)
    files: list[str] = []
    for entry in environ.get("KUBECONFIG", "").split(os.pathsep):
        path = os.path.expanduser(entry) if entry else ""
        if path and os.path.exists(path) and path not in files:
            files.append(path)
    return tuple(files)


def _first_current_context(files: tuple[str, ...]) -> str | None:
    """kubectl's current context of merged files: the first file that sets one wins.

    kubernetes-asyncio merges clusters, users and contexts first-wins as kubectl does, but lets
    the *last* file's `current-context` win; pinning the context this way keeps the merge
    kubectl's.
    """
    for path in files:
        with open(path, encoding="utf-8") as stream:
            document = yaml.safe_load(stream)
        if isinstance(document, dict) and document.get("current-context"):
            return str(document["current-context"])
    return None


async def _load_kubeconfig(
    files: tuple[str, ...], context: str, configuration: k8s_client.Configuration
) -> None:
    if len(files) > 1 and not context:
        context = _first_current_context(files) or ""
    # kubernetes-asyncio splits `config_file` on the same separator and merges the files.
    await k8s_config.load_kube_config(
        config_file=os.pathsep.join(files),
        context=context or None,
        client_configuration=configuration,
    )


class KubeClient:
    """Raw-JSON API access with call accounting. Create with `await KubeClient.connect(...)`."""

    def __init__(self, api_client: Any, request_timeout: float = 30.0) -> None:
        self._api = api_client
        self.request_timeout = request_timeout
        self.calls: Counter[tuple[str, str, str]] = Counter()

    @classmethod
    async def connect(
        cls, settings: ClientSettings, environ: Mapping[str, str] | None = None
    ) -> KubeClient:
        """Connect as kubectl would: `settings.kubeconfig`, then `$KUBECONFIG` (read from
        `environ`, by default the process environment), then in-cluster config."""
        configuration = k8s_client.Configuration()
        files = kubeconfig_files(settings.kubeconfig, os.environ if environ is None else environ)
        if files:
            try:
                await _load_kubeconfig(files, settings.context, configuration)
            except (k8s_config.ConfigException, yaml.YAMLError, OSError) as error:
                raise ApiError(
                    0, "BadKubeconfig", f"cannot load kubeconfig {os.pathsep.join(files)}: {error}"
                ) from None
        else:
            try:
                k8s_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
            except k8s_config.ConfigException as error:
                raise ApiError(
                    0,
                    "NoConfig",
                    f"not running in a cluster ({error}); give --kubeconfig or set KUBECONFIG",
                ) from None
        return cls(k8s_client.ApiClient(configuration=configuration), settings.request_timeout)

    @property
    def host(self) -> str:
        return str(self._api.configuration.host)

    async def close(self) -> None:
        await self._api.close()

    # -- the one request path -----------------------------------------------------------------

    async def _request(
        self,
        verb: str,
        resource: Resource,
        method: str,
        path: str,
        *,
        subresource: str = "",
        query: Mapping[str, Any] | None = None,
        body: Any = None,
        content_type: str | None = None,
        request_timeout: float | aiohttp.ClientTimeout | None = None,
    ) -> aiohttp.ClientResponse:
        plural = f"{resource.plural}/{subresource}" if subresource else resource.plural
        self.calls[(verb, resource.group, plural)] += 1
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        query_params = [(k, _query_value(v)) for k, v in (query or {}).items() if v is not None]
        try:
            response: aiohttp.ClientResponse = await self._api.call_api(
                path,
                method,
                query_params=query_params,
                header_params=headers,
                body=body,
                auth_settings=["BearerToken"],
                _preload_content=False,
                _request_timeout=request_timeout
                if request_timeout is not None
                else self.request_timeout,
            )
        except ApiException as error:
            raise Unavailable(error.status or 0, "Unavailable", str(error.reason)) from None
        except (aiohttp.ClientError, TimeoutError, OSError) as error:
            raise Unavailable(0, "Unavailable", f"{method} {path}: {error!r}") from None
        if not 200 <= response.status < 300:
            try:
                payload = await response.read()
            except (aiohttp.ClientError, TimeoutError):
                payload = b""
            finally:
                response.release()
            raise _error_for(response.status, payload)
        return response

    async def _json(self, response: aiohttp.ClientResponse) -> dict[str, Any]:
        try:
            payload = await response.read()
        except (aiohttp.ClientError, TimeoutError) as error:
            raise Unavailable(0, "Unavailable", f"reading the response: {error!r}") from None
        finally:
            response.release()
        try:
            data = json.loads(payload)
        except ValueError:
            raise ApiError(response.status, "BadResponse", "response is not JSON") from None
        if not isinstance(data, dict):
            raise ApiError(response.status, "BadResponse", "response is not a JSON object")
        return data

    # -- verbs --------------------------------------------------------------------------------

    async def list(
        self,
        resource: Resource,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        resource_version: str | None = None,
        limit: int | None = None,
        continue_token: str | None = None,
    ) -> dict[str, Any]:
        response = await self._request(
            "list",
            resource,
            "GET",
            resource.path(namespace),
            query={
                "labelSelector": label_selector,
                "fieldSelector": field_selector,
                "resourceVersion": resource_version,
                "limit": limit,
                "continue": continue_token,
            },
        )
        return await self._json(response)

    async def watch(
        self,
        resource: Resource,
        resource_version: str,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        timeout_seconds: int = 300,
        bookmarks: bool = True,
        read_timeout: float | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Yield watch events (`{"type": ..., "object": ...}`) until the server ends the stream.

        An `ERROR` event is turned into the matching `ApiError` (`Expired` for 410). A line that
        is not JSON raises `ApiError("BadResponse")`: the caller restarts the watch.
        """
        response = await self._request(
            "watch",
            resource,
            "GET",
            resource.path(namespace),
            query={
                "watch": "true",
                "resourceVersion": resource_version,
                "allowWatchBookmarks": "true" if bookmarks else None,
                "timeoutSeconds": timeout_seconds,
                "labelSelector": label_selector,
                "fieldSelector": field_selector,
            },
            request_timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=self.request_timeout, sock_read=read_timeout
            ),
        )
        try:
            while True:
                try:
                    line = await response.content.readline()
                except (aiohttp.ClientError, TimeoutError, asyncio.IncompleteReadError) as error:
                    raise Unavailable(0, "WatchBroken", repr(error)) from None
                if not line:
                    return
                if not line.strip():
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    raise ApiError(
                        200, "BadResponse", f"watch line is not JSON: {line[:200]!r}"
                    ) from None
                if not isinstance(event, dict) or not isinstance(event.get("object"), dict):
                    raise ApiError(200, "BadResponse", "watch event without an object")
                if event.get("type") == "ERROR":
                    status = event["object"]
                    code = int(status.get("code") or 500)
                    raise _error_for(code, json.dumps(status).encode())
                yield event
        finally:
            response.release()

    async def get(
        self, resource: Resource, name: str, namespace: str | None = None, subresource: str = ""
    ) -> dict[str, Any]:
        response = await self._request(
            "get",
            resource,
            "GET",
            resource.path(namespace, name, subresource or None),
            subresource=subresource,
        )
        return await self._json(response)

    async def create(
        self, resource: Resource, body: Mapping[str, Any], namespace: str | None = None
    ) -> dict[str, Any]:
        response = await self._request(
            "create", resource, "POST", resource.path(namespace), body=dict(body)
        )
        return await self._json(response)

    async def replace(
        self,
        resource: Resource,
        name: str,
        body: Mapping[str, Any],
        namespace: str | None = None,
        subresource: str = "",
    ) -> dict[str, Any]:
        response = await self._request(
            "update",
            resource,
            "PUT",
            resource.path(namespace, name, subresource or None),
            subresource=subresource,
            body=dict(body),
        )
        return await self._json(response)

    async def patch(
        self,
        resource: Resource,
        name: str,
        patch: Any,
        namespace: str | None = None,
        *,
        subresource: str = "",
        content_type: str = MERGE_PATCH,
    ) -> dict[str, Any]:
        response = await self._request(
            "patch",
            resource,
            "PATCH",
            resource.path(namespace, name, subresource or None),
            subresource=subresource,
            body=patch,
            content_type=content_type,
        )
        return await self._json(response)

    async def delete(
        self,
        resource: Resource,
        name: str,
        namespace: str | None = None,
        *,
        grace_period_seconds: int | None = None,
        preconditions: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"kind": "DeleteOptions", "apiVersion": "v1"}
        if grace_period_seconds is not None:
            body["gracePeriodSeconds"] = grace_period_seconds
        if preconditions:
            body["preconditions"] = dict(preconditions)
        response = await self._request(
            "delete", resource, "DELETE", resource.path(namespace, name), body=body
        )
        return await self._json(response)


def _query_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
