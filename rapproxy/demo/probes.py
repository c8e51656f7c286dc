"""Client-side probes the demo runs inside node-1's namespace (through `Namespace.call`).

Module-level and picklable, like `rapproxy.testing.probes`: each runs in a worker process
started inside the namespace and returns plain data.
"""

from __future__ import annotations

import json
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
