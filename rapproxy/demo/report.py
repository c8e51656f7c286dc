"""The demo's results and how they are shown: a text table, Markdown, JSON and a PNG chart.

Pure: values in, text or a file out (matplotlib draws off-screen with the Agg backend). The
scenario measures, this module only presents, so the presentation is testable without a
cluster and the numbers printed are exactly the numbers saved.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rapproxy.demo.options import STATIC_POLICIES
from rapproxy.testing.load import CLOSED_LOOP_NOTE


@dataclass(frozen=True, slots=True)
class PolicyRun:
    """One policy under load in one phase (e.g. "node-1 healthy")."""

    phase: str
    policy: str
    requests: int
    duration_s: float
    errors: int
    p50_ms: float
    p99_ms: float
    local_share: float | None  # of the connections node-1's rapproxy placed; None: unknown
    round_rates: tuple[float, ...] = ()  # req/s of every round when it ran several (this: median)

    @property
    def rate(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0


@dataclass(frozen=True, slots=True)
class FailoverResult:
    """A primary's process killed, seen from a client probing the ClusterIP and from the BPS."""

    killed_pod: str
    node: str
    promoted_pod: str | None
    first_error_s: float | None  # kill → first failed probe request
    first_promoted_s: float | None  # kill → first request answered by the promoted pod
    restored_s: float | None  # kill → the BackupPodSet's full set restored (its restoredAt)
    probe_requests: int  # requests the client's load started after the kill
    probe_errors: int  # ... of which failed (refused, reset, timed out, wrong answer)
    last_failover: dict[str, Any] = field(default_factory=dict)  # the BPS status section
    timeline: str = ""
    load_rate: float | None = None  # the open-loop load's requests/s; None: a single-probe run
    failed_at_s: tuple[float, ...] = ()  # when each failed request was sent, after the kill
    load_timeline: tuple[dict[str, Any], ...] = ()  # outcomes per 0.25 s from the kill


@dataclass(frozen=True, slots=True)
class DemoResults:
    setting: dict[str, Any]  # delays, scale, duration, connections, how overload was made
    runs: tuple[PolicyRun, ...]
    failover: FailoverResult | None
    notes: tuple[str, ...] = ()

    def phases(self) -> list[str]:
        return list(dict.fromkeys(run.phase for run in self.runs))


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.0f} %"


def best_static(runs: Sequence[PolicyRun], phase: str) -> PolicyRun | None:
    """The static policy (round-robin, random, least-conn, local-only) with most req/s."""
    static = [r for r in runs if r.phase == phase and r.policy in STATIC_POLICIES]
    return max(static, key=lambda r: r.rate, default=None)


def comparison_table(runs: Sequence[PolicyRun]) -> str:
    """One row per policy and phase; request rates against round-robin and local-only in the
    same phase (the paper's baselines: kube-proxy's spreading, and staying on the node), and
    against the best static policy of the phase (what an adaptive policy must not lose to)."""
    headers = [
        *("PHASE", "POLICY", "REQ/S", "ROUNDS", "P50 MS", "P99 MS", "ERRORS", "LOCAL"),
        *("VS RR", "VS LOCAL-ONLY", "VS BEST STATIC"),
    ]

    def ratio(run: PolicyRun, policy: str) -> str:
        baseline = next((r for r in runs if r.phase == run.phase and r.policy == policy), None)
        return f"{run.rate / baseline.rate:.2f}x" if baseline and baseline.rate > 0 else "-"

    def versus_best(run: PolicyRun) -> str:
        best = best_static(runs, run.phase)
        if best is None or best.rate <= 0:
            return "-"
        text = f"{run.rate / best.rate:.2f}x ({best.policy})"
        return text + " level" if is_level(run, best) else text

    rows = []
    for run in runs:
        rows.append(
            [
                run.phase,
                run.policy,
                f"{run.rate:.0f}",
                "/".join(f"{r:.0f}" for r in run.round_rates) or "-",
                f"{run.p50_ms:.1f}",
                f"{run.p99_ms:.1f}",
                str(run.errors),
                _share(run.local_share),
                ratio(run, "round-robin"),
                ratio(run, "local-only"),
                versus_best(run),
            ]
        )
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in [headers, *rows]
    ]
    note = (
        "level: below the best static policy, but above that policy's own slowest round "
        "(the rounds' noise)"
    )
    return "\n".join(lines) + f"\n({CLOSED_LOOP_NOTE})\n({note})\n"


def is_level(run: PolicyRun, best: PolicyRun) -> bool:
    """Slower than `best` by less than `best`'s own rounds differ among themselves."""
    return (
        run.policy not in STATIC_POLICIES
        and run.rate < best.rate
        and bool(best.round_rates)
        and run.rate >= min(best.round_rates)
    )


def failover_text(failover: FailoverResult) -> str:
    def seconds(value: float | None) -> str:
        return "not seen" if value is None else f"{value * 1000:.0f} ms"

    lines = [
        f"killed: the process of primary {failover.killed_pod} on {failover.node} (SIGKILL)",
        f"promoted: {failover.promoted_pod or 'none seen'}",
        (
            f"client (open-loop load of {failover.load_rate:g} req/s from node-1 through the "
            "ClusterIP, from 0.5 s before the kill to 0.5 s after the set was restored; after the "
            f"kill {failover.probe_requests} requests sent, {failover.probe_errors} failed):"
            if failover.load_rate
            else f"client (probing the ClusterIP from node-1, {failover.probe_requests} requests, "
            f"{failover.probe_errors} failed):"
        ),
        f"  kill -> first failed request:              {seconds(failover.first_error_s)}",
        f"  kill -> first request served by promoted:  {seconds(failover.first_promoted_s)}",
        f"  kill -> full set restored (BackupPodSet):  {seconds(failover.restored_s)}",
        "  (the paper reports 1.933 s from a primary's deletion to the set restored)",
    ]
    if failover.failed_at_s:
        shown = ", ".join(f"{t * 1000:.0f}" for t in failover.failed_at_s[:20])
        more = len(failover.failed_at_s) - 20
        lines.append(
            f"  failed requests sent at (ms after the kill): {shown}"
            + (f" and {more} more" if more > 0 else "")
        )
    if failover.timeline:
        lines += ["BackupPodSet status (lastFailover):", failover.timeline.rstrip("\n")]
    return "\n".join(lines) + "\n"


def summary_text(results: DemoResults) -> str:
    parts = ["RAP vs the static policies (load from node-1's host network)"]
    parts.append(comparison_table(results.runs))
    if results.failover is not None:
        parts.append("Failover")
        parts.append(failover_text(results.failover))
    parts += [f"note: {note}" for note in results.notes]
    return "\n".join(parts).rstrip("\n") + "\n"


def to_json(results: DemoResults) -> str:
    document = {
        "setting": results.setting,
        "runs": [{**asdict(run), "rate": round(run.rate, 2)} for run in results.runs],
        "failover": asdict(results.failover) if results.failover is not None else None,
        "notes": list(results.notes),
        "closedLoopNote": CLOSED_LOOP_NOTE,
    }
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


def to_markdown(results: DemoResults) -> str:
    lines = ["# rapproxy demo results", "", "Setting:", ""]
    lines += [f"- {key}: {value}" for key, value in results.setting.items()]
    lines += ["", "| phase | policy | req/s | p50 ms | p99 ms | errors | local |"]
    lines.append("|---|---|---:|---:|---:|---:|---:|")
    for run in results.runs:
        lines.append(
            f"| {run.phase} | {run.policy} | {run.rate:.0f} | {run.p50_ms:.1f} | "
            f"{run.p99_ms:.1f} | {run.errors} | {_share(run.local_share)} |"
        )
    lines += ["", f"_{CLOSED_LOOP_NOTE}._", ""]
    if results.failover is not None:
        lines += ["## Failover", "", "```", failover_text(results.failover).rstrip("\n"), "```"]
    lines += [""] + [f"- {note}" for note in results.notes]
    return "\n".join(lines).rstrip("\n") + "\n"


def write_chart(results: DemoResults, path: Path) -> Path:
    """Throughput and p99 per policy, one group of bars per phase, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = results.phases()
    policies = list(dict.fromkeys(run.policy for run in results.runs))
    figure, (rate_axes, p99_axes) = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / max(1, len(policies))
    for index, policy in enumerate(policies):
        runs = {r.phase: r for r in results.runs if r.policy == policy}
        positions = [p + (index - (len(policies) - 1) / 2) * width for p in range(len(phases))]
        rates = [runs[ph].rate if ph in runs else 0.0 for ph in phases]
        p99s = [runs[ph].p99_ms if ph in runs else 0.0 for ph in phases]
        rate_axes.bar(positions, rates, width, label=policy)
        p99_axes.bar(positions, p99s, width, label=policy)
    for axes, title, unit in (
        (rate_axes, "throughput", "requests/s"),
        (p99_axes, "p99 latency (closed loop)", "ms"),
    ):
        axes.set_xticks(range(len(phases)), phases)
        axes.set_title(title)
        axes.set_ylabel(unit)
        axes.grid(axis="y", alpha=0.3)
    rate_axes.legend()
    delays = results.setting.get("delays_ms", "")
    figure.suptitle(f"rapproxy demo: load from node-1, one-way delays {delays}", fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
