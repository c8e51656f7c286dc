"""Load generation for the demo and the edge benchmarks: wrk inside a namespace, summarised.

wrk is closed-loop: each connection sends its next request only after the previous answer, so
a stall slows the load down instead of queueing requests, and the percentiles it reports
under-report the tail an open-loop client would see (coordinated omission). Every figure printed
from here says so.

The summary comes from a Lua `done()` hook only, so wrk keeps its fast path (no Lua per request).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CLOSED_LOOP_NOTE = (
    "wrk is closed-loop: its percentiles under-report tail latency (coordinated omission)"
)

WRK_SUMMARY_LUA = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%.0f,"bytes":%.0f,"duration_us":%.0f,"connect_errors":%.0f,' ..
    '"read_errors":%.0f,"write_errors":%.0f,"status_errors":%.0f,"timeouts":%.0f,' ..
    '"p50_us":%.0f,"p90_us":%.0f,"p99_us":%.0f,"max_us":%.0f,"mean_us":%.1f}\\n',
    summary.requests, summary.bytes, summary.duration, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
"""


class LoadError(RuntimeError):
    """wrk did not produce a summary; the message carries its output."""


@dataclass(frozen=True, slots=True)
class LoadResult:
    requests: int
    duration_s: float
    errors: int
    p50_ms: float
    p99_ms: float

    @property
    def rate(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0


def write_lua(directory: Path) -> Path:
    path = directory / "wrk-summary.lua"
    path.write_text(WRK_SUMMARY_LUA)
    return path


def wrk_argv(
    url: str,
    lua: Path,
    *,
    duration: float,
    connections: int,
    close: bool = False,
    timeout: str = "5s",
) -> list[str]:
    argv = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",  # wrk takes whole seconds only
        f"--timeout={timeout}",
        "-s",
        str(lua),
    ]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(url)
    return argv


def parse_wrk(stdout: str, stderr: str = "") -> LoadResult:
    for line in stdout.splitlines():
        if line.startswith("WRKJSON "):
            raw = json.loads(line[len("WRKJSON ") :])
            errors = sum(
                int(raw[key])
                for key in (
                    "connect_errors",
                    "read_errors",
                    "write_errors",
                    "status_errors",
                    "timeouts",
                )
            )
            return LoadResult(
                requests=int(raw["requests"]),
                duration_s=raw["duration_us"] / 1e6,
                errors=errors,
                p50_ms=raw["p50_us"] / 1000,
                p99_ms=raw["p99_us"] / 1000,
            )
    raise LoadError(f"wrk printed no summary:\n{stdout[-2000:]}\n{stderr[-2000:]}")


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2
