"""Client-side probes the demo runs inside node-1's namespace (through `Namespace.call`).

Module-level and picklable, like `rapproxy.testing.probes`: each runs in a worker process
started inside the namespace and returns plain data.
"""

from __future__ import annotations

import json
import time
from typing import Any

from rapproxy.testing.probes import http_get


def debug_state(url: str) -> Any:
    """The daemon's `/debug/state` document (its metrics port is local to the node)."""
    status, body = http_get(url, 2.0)
    if status != 200:
        raise OSError(f"{url}: HTTP {status}")
    return json.loads(body)


def serving_names(url: str, count: int) -> list[str]:
    """Which backends answer `count` fresh requests ("" for a failed one)."""
    names = []
    for _ in range(count):
        try:
            status, body = http_get(url, 1.0)
        except OSError:
            names.append("")
            continue
        names.append(body.split("\n", 1)[0] if status == 200 else "")
    return names


def failover_probe(
    url: str, known: list[str], within: float, interval: float = 0.02, timeout: float = 0.5
) -> list[tuple[float, str]]:
    """GET `url` every `interval` s until a backend not in `known` answers, or `within` s.

    Returns (wall-clock time, backend name or "" for a failure) per request; wall-clock so the
    caller can line the samples up with its own kill time and the BackupPodSet's timestamps.
    """
    samples: list[tuple[float, str]] = []
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        sent = time.time()
        try:
            status, body = http_get(url, timeout)
            name = body.split("\n", 1)[0] if status == 200 else ""
        except OSError:
            name = ""
        samples.append((sent, name))
        if name and name not in known:
            break
        time.sleep(interval)  # the probe's request rate, not synchronisation
    return samples
