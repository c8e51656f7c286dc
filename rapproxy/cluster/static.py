"""A static source: Services and EndpointSlices from Kubernetes YAML files, reloaded on change.

This is how rapproxy runs without a cluster (`rapproxy run --objects svc.yaml ...`): tests,
benchmarks and a quick trial feed it manifests in the API's own form. Each reload replaces the
recorded state as a re-list would, so deleting an object from a file deletes it from the proxy.

A file that fails to parse is reported and its previous content is kept: a half-written file
must not make every service it describes disappear.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

SUPPORTED_KINDS = ("Service", "EndpointSlice", "Node")


class ManifestError(ValueError):
    """A manifest file that cannot be read as Kubernetes objects; names file and document."""


@dataclass(frozen=True, slots=True)
class Objects:
    services: tuple[dict[str, Any], ...] = ()
    slices: tuple[dict[str, Any], ...] = ()
    nodes: tuple[dict[str, Any], ...] = ()


def parse_manifests(text: str, source: str) -> Objects:
    """Split a multi-document YAML (or a `kind: List`) into the kinds the proxy consumes.

    Unknown kinds are ignored (a manifest bundle may hold Deployments too); a document that is not
    a mapping with a `kind` is an error naming its position.
    """
    services: list[dict[str, Any]] = []
    slices: list[dict[str, Any]] = []
    nodes: list[dict[str, Any]] = []
    try:
        documents = list(yaml.safe_load_all(text))
    except yaml.YAMLError as error:
        raise ManifestError(f"{source}: not valid YAML: {error}") from None
    queue: list[tuple[str, object]] = [(f"{source}#{i}", d) for i, d in enumerate(documents)]
    while queue:
        where, document = queue.pop(0)
        if document is None:
            continue
        if not isinstance(document, dict) or not isinstance(document.get("kind"), str):
            raise ManifestError(f"{where}: expected a Kubernetes object with a 'kind'")
        kind = document["kind"]
        if kind == "List" or kind.endswith("List"):
            items = document.get("items") or []
            if not isinstance(items, list):
                raise ManifestError(f"{where}: items must be a list")
            queue.extend((f"{where}.items[{i}]", item) for i, item in enumerate(items))
            continue
        meta = document.setdefault("metadata", {})
        if isinstance(meta, dict) and kind != "Node":
            meta.setdefault("namespace", "default")
        if kind == "Service":
            services.append(document)
        elif kind == "EndpointSlice":
            slices.append(document)
        elif kind == "Node":
            nodes.append(document)
    return Objects(tuple(services), tuple(slices), tuple(nodes))


class StaticSource:
    """Watches a set of files; calls `apply(objects)` with the union of all files on change."""

    def __init__(
        self,
        paths: Sequence[Path],
        apply: Callable[[Objects], None],
        poll_interval: float = 1.0,
    ) -> None:
        self.paths = list(paths)
        self._apply = apply
        self.poll_interval = poll_interval
        self._stamps: dict[Path, tuple[int, int, int] | None] = {}
        self._contents: dict[Path, Objects] = {}
        self.errors: dict[Path, str] = {}
        self.synced = False

    def _stamp(self, path: Path) -> tuple[int, int, int] | None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def load_changed(self) -> bool:
        """Re-read files whose stamp changed; apply the union if anything did."""
        changed = False
        for path in self.paths:
            stamp = self._stamp(path)
            if path in self._stamps and self._stamps[path] == stamp:
                continue
            self._stamps[path] = stamp
            if stamp is None:
                if path not in self.errors:
                    log.error("objects file %s does not exist; keeping what it held before", path)
                self.errors[path] = "file does not exist"
                continue
            try:
                objects = parse_manifests(path.read_text(), str(path))
            except (ManifestError, OSError, UnicodeDecodeError) as error:
                log.error("cannot load %s (keeping its previous objects): %s", path, error)
                self.errors[path] = str(error)
                continue
            self.errors.pop(path, None)
            self._contents[path] = objects
            changed = True
        if changed or not self.synced:
            merged = Objects(
                services=tuple(o for c in self._contents.values() for o in c.services),
                slices=tuple(o for c in self._contents.values() for o in c.slices),
                nodes=tuple(o for c in self._contents.values() for o in c.nodes),
            )
            self._apply(merged)
            self.synced = True
        return changed

    async def run(self) -> None:
        """Load now, then poll for changes until cancelled."""
        while True:
            self.load_changed()
            await asyncio.sleep(self.poll_interval)
