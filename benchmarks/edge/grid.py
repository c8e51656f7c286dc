"""Issue 11's grid: is RAP ever worse than the best static policy?

Cells: one-way delay scale (the 4/8/3 ms matrix times 0.25, 1, 2) x wrk connections (2, 8, 32)
x node-1 healthy / node-1 overloaded, plus node-2 overloaded at scale 1. In each cell every
policy — `rap`, its utilization variants `rap-aimd` and `rap-switch`, and the static
`round-robin`, `random`, `least-conn`, `local-only` — runs `rounds` times, interleaved in a
rotated order, and the median round by req/s counts (run.py's `rounds_of`). One cluster serves
the whole grid: delays change live on the WAN router, overload is made and removed in place.

"Overloaded" is the demo's: the node's pods capped to 0.25 CPU with a CPU-bound neighbour pod.
Healthy nodes have 2 CPUs for pods and each request costs 0.5 ms of backend CPU (demo defaults).

Per cell the verdicts of issue 11: rap req/s >= 1.0x the best static policy's and rap p99 <=
1.1x that policy's p99; with node-1 overloaded rap >= 1.3x local-only; healthy, >= 0.95x.
A cell whose only miss is req/s, with rap within 2 % of the best static policy or at least as
fast as that policy's own slowest round, is called *level*: where rap routes exactly as that
policy does (all local on a healthy node) the ratio is the rounds' noise, which here is 3-7 %
between rounds of one policy.

Issue 13's kernel fast path runs as two more variants, `rap-kernel` (Service web DNATed by
node-1's iptables with RAP's telemetry weights) and `random-kernel` (uniform DNAT: kube-proxy's
iptables mode). Its verdicts per cell: rap-kernel req/s >= 0.9x userspace rap's, and, with
node-1 healthy and node-1's nearest peer >= 10 ms away one way, >= 5x round-robin's.

Usage (root): `.venv/bin/python benchmarks/edge/run.py grid [--quick] [--rounds N] ...`
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from common import Point, cluster, header, rounds_of  # benchmarks/edge/common.py

from rapproxy.demo.options import BASE_DELAYS_MS, STATIC_POLICIES, DemoOptions
from rapproxy.demo.progress import Progress
from rapproxy.demo.report import PolicyRun
from rapproxy.testing.edge.delays import DelayMatrix
from rapproxy.testing.load import CLOSED_LOOP_NOTE, write_lua

HEALTHY = "healthy"
STATES = {HEALTHY: None, "node-1 overloaded": "node-1", "node-2 overloaded": "node-2"}
TARGET_VS_BEST = 1.0
TARGET_P99 = 1.1
TARGET_OVERLOADED_VS_LOCAL = 1.3
TARGET_HEALTHY_VS_LOCAL = 0.95
LEVEL_VS_BEST = 0.98  # req/s this close to the best static policy's counts as level
KERNEL = "rap-kernel"
TARGET_KERNEL_VS_RAP = 0.9
TARGET_KERNEL_VS_ROUND_ROBIN = 5.0
KERNEL_VS_ROUND_ROBIN_FROM_MS = 10.0  # node-1's nearest peer at least this far, one way


@dataclass(frozen=True, slots=True)
class Cell:
    scale: float
    connections: int
    state: str


@dataclass(frozen=True, slots=True)
class CellResult:
    cell: Cell
    points: tuple[Point, ...]

    def of(self, policy: str) -> Point | None:
        return next((p for p in self.points if p.run.policy == policy), None)

    def best_static(self) -> Point | None:
        static = [p for p in self.points if p.run.policy in STATIC_POLICIES]
        return max(static, key=lambda p: p.rate, default=None)

    def verdicts(self) -> dict[str, Any]:
        rap, best, local = self.of("rap"), self.best_static(), self.of("local-only")
        out: dict[str, Any] = {
            "best_static": None if best is None else best.run.policy,
            "rap_vs_best": _ratio(rap and rap.rate, best and best.rate),
            "rap_p99_vs_best": _ratio(rap and rap.run.p99_ms, best and best.run.p99_ms),
            "rap_vs_local_only": _ratio(rap and rap.rate, local and local.rate),
        }
        vs_best, p99, vs_local = (
            out["rap_vs_best"],
            out["rap_p99_vs_best"],
            out["rap_vs_local_only"],
        )
        misses = []
        if vs_best is None or vs_best < TARGET_VS_BEST:
            misses.append("req/s")
        if p99 is None or p99 > TARGET_P99:
            misses.append("p99")
        floor = {"node-1 overloaded": TARGET_OVERLOADED_VS_LOCAL, HEALTHY: TARGET_HEALTHY_VS_LOCAL}
        wanted = floor.get(self.cell.state)
        if wanted is not None and (vs_local is None or vs_local < wanted):
            misses.append("vs local-only")
        out["misses"] = misses
        out["met"] = not misses
        within_spread = (
            rap is not None
            and best is not None
            and bool(best.round_rates)
            and rap.rate >= min(best.round_rates)
        )
        out["within_best_spread"] = within_spread
        out["level"] = (
            misses == ["req/s"]
            and vs_best is not None
            and (vs_best >= LEVEL_VS_BEST or within_spread)
        )
        return out

    def node1_nearest_ms(self) -> float:
        return min(ms for pair, ms in BASE_DELAYS_MS.items() if "node-1" in pair) * self.cell.scale

    def kernel_verdicts(self) -> dict[str, Any] | None:
        """Issue 13's targets for `rap-kernel` in this cell; None when it did not run here."""
        kernel, rap, rr = self.of(KERNEL), self.of("rap"), self.of("round-robin")
        if kernel is None:
            return None
        vs_rap = _ratio(kernel.rate, rap and rap.rate)
        vs_rr = _ratio(kernel.rate, rr and rr.rate)
        rr_applies = (
            self.cell.state == HEALTHY
            and self.node1_nearest_ms() >= KERNEL_VS_ROUND_ROBIN_FROM_MS - 1e-9
        )
        misses = []
        if vs_rap is None or vs_rap < TARGET_KERNEL_VS_RAP:
            misses.append("vs rap")
        if rr_applies and (vs_rr is None or vs_rr < TARGET_KERNEL_VS_ROUND_ROBIN):
            misses.append("vs round-robin")
        return {
            "kernel_vs_rap": vs_rap,
            "kernel_p99_vs_rap": _ratio(kernel.run.p99_ms, rap and rap.run.p99_ms),
            "kernel_vs_round_robin": vs_rr,
            "round_robin_target_applies": rr_applies,
            "misses": misses,
            "met": not misses,
        }

    def verdict(self) -> str:
        v = self.verdicts()
        if v["met"]:
            return "met"
        if v["level"]:
            return "level"
        return "missed: " + ", ".join(v["misses"])


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def grid_cells(
    scales: Sequence[float],
    levels: Sequence[int],
    remote_scale: float | None,
    only_states: Sequence[str] | None = None,
) -> list[Cell]:
    """The cells in run order; `only_states` (keys of STATES) keeps a subset, for trials."""
    cells = []
    for scale in scales:
        states = [HEALTHY, "node-1 overloaded"]
        if remote_scale is not None and math.isclose(scale, remote_scale):
            states.append("node-2 overloaded")
        if only_states is not None:
            states = [state for state in states if state in only_states]
        cells += [Cell(scale, c, state) for state in states for c in levels]
    return cells


async def grid(
    options: DemoOptions, cells: Sequence[Cell], rounds: int, progress: Progress
) -> list[CellResult]:
    results: list[CellResult] = []
    async with cluster(options, progress) as demo:
        lua = write_lua(demo.workdir)
        edge = demo.require_edge()
        scale: float | None = None
        state = HEALTHY
        for cell in cells:
            if cell.state != state and STATES[state] is not None:
                with progress.step(f"relieving {STATES[state]}"):
                    await demo.relieve_node(STATES[state] or "")
                state = HEALTHY
            if cell.scale != scale:
                scale = cell.scale
                delays = replace(options, delay_scale=scale).delays_ms()
                await edge.set_delays(DelayMatrix.symmetric(delays))
                progress.say(
                    f"delay scale {scale:g}: one-way "
                    + ", ".join(f"{a}-{b} {ms:g} ms" for (a, b), ms in delays.items())
                )
            if cell.state != state:
                with progress.step(f"overloading {STATES[cell.state]}"):
                    await demo.overload_node(STATES[cell.state] or "")
                state = cell.state
            label = f"x{cell.scale:g} c{cell.connections} {cell.state}"
            progress.say(label)
            points = await rounds_of(
                demo,
                replace(options, connections=cell.connections),
                setting=cell.connections,
                label=label,
                rounds=rounds,
                lua=lua,
                progress=progress,
            )
            result = CellResult(cell, tuple(points))
            verdict = result.verdicts()
            progress.say(
                f"  -> rap {fmt(verdict['rap_vs_best'])} of best static "
                f"({verdict['best_static']}), p99 {fmt(verdict['rap_p99_vs_best'])}, "
                f"{fmt(verdict['rap_vs_local_only'])} local-only: {result.verdict()}"
            )
            kernel = result.kernel_verdicts()
            if kernel is not None:
                progress.say(
                    f"  -> rap-kernel {fmt(kernel['kernel_vs_rap'])} of rap, "
                    f"{fmt(kernel['kernel_vs_round_robin'])} round-robin: "
                    + ("met" if kernel["met"] else "missed: " + ", ".join(kernel["misses"]))
                )
            results.append(result)
        if STATES[state] is not None:
            await demo.relieve_node(STATES[state] or "")
    return results


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def grid_markdown(
    results: Sequence[CellResult], env: dict[str, Any], options: DemoOptions, rounds: int
) -> str:
    lines = header("Issue 11's grid: RAP against every static policy", env, options)
    lines += [
        f"- {rounds} interleaved round(s) per cell, the median round by req/s per policy; "
        "best static = the highest req/s among round-robin, random, least-conn, local-only",
        "- overloaded = the node's pods capped to 0.25 CPU with a CPU-bound neighbour pod "
        "(the demo's overload)",
        "",
        "## Verdicts",
        "",
        "| delay scale | connections | state | best static | rap / best req/s | "
        "rap / best p99 | rap / local-only | verdict |",
        "|---:|---:|---|---|---:|---:|---:|---|",
    ]
    verdicts = [result.verdict() for result in results]
    for result, verdict in zip(results, verdicts, strict=True):
        v = result.verdicts()
        c = result.cell
        lines.append(
            f"| {c.scale:g} | {c.connections} | {c.state} | {v['best_static']} | "
            f"{fmt(v['rap_vs_best'])} | {fmt(v['rap_p99_vs_best'])} | "
            f"{fmt(v['rap_vs_local_only'])} | {verdict} |"
        )
    met, level = verdicts.count("met"), verdicts.count("level")
    lines += [
        "",
        f"Cells meeting every target: {met} of {len(results)}; level (every target but req/s, "
        f"that within {(1 - LEVEL_VS_BEST) * 100:.0f} % of the best static policy's or above "
        f"its slowest round): {level}; missed: {len(results) - met - level}.",
        "",
    ]
    kernel_rows = [(r, r.kernel_verdicts()) for r in results]
    kernel_rows = [(r, k) for r, k in kernel_rows if k is not None]
    if kernel_rows:
        lines += [
            "## Kernel fast path (issue 13)",
            "",
            f"`{KERNEL}`: Service web DNATed by node-1's iptables with RAP's telemetry weights; "
            "`random-kernel`: uniform DNAT, kube-proxy's iptables mode. Targets: rap-kernel "
            f">= {TARGET_KERNEL_VS_RAP}x userspace rap's req/s in every cell; >= "
            f"{TARGET_KERNEL_VS_ROUND_ROBIN:g}x round-robin's with node-1 healthy and its nearest "
            f"peer >= {KERNEL_VS_ROUND_ROBIN_FROM_MS:g} ms away (one way).",
            "",
            "| delay scale | node-1 nearest peer | connections | state | rap-kernel / rap req/s "
            "| rap-kernel / rap p99 | rap-kernel / round-robin | verdict |",
            "|---:|---:|---:|---|---:|---:|---:|---|",
        ]
        for result, k in kernel_rows:
            c = result.cell
            rr = fmt(k["kernel_vs_round_robin"]) + (
                "" if k["round_robin_target_applies"] else " (-)"
            )
            verdict = "met" if k["met"] else "missed: " + ", ".join(k["misses"])
            lines.append(
                f"| {c.scale:g} | {result.node1_nearest_ms():g} ms | {c.connections} | {c.state} "
                f"| {fmt(k['kernel_vs_rap'])} | {fmt(k['kernel_p99_vs_rap'])} | {rr} | {verdict} |"
            )
        met = sum(1 for _, k in kernel_rows if k["met"])
        lines += [
            "",
            f"Cells meeting the kernel targets: {met} of {len(kernel_rows)}. (-): the round-robin "
            "target does not apply to that cell.",
            "",
        ]
    lines += [
        "## Every policy",
    ]
    lines += [
        "",
        "| delay scale | connections | state | policy | req/s | p50 ms | p99 ms | errors | "
        "kept local | req/s of each round |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for result in results:
        c = result.cell
        for p in result.points:
            r = p.run
            local = "-" if r.local_share is None else f"{r.local_share * 100:.0f} %"
            each = " / ".join(f"{v:.0f}" for v in p.round_rates) or f"{p.rate:.0f}"
            lines.append(
                f"| {c.scale:g} | {c.connections} | {c.state} | {r.policy} | {r.rate:.0f} | "
                f"{r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.errors} | {local} | {each} |"
            )
    return "\n".join([*lines, "", f"_{CLOSED_LOOP_NOTE}._", ""])


def grid_json(results: Sequence[CellResult]) -> list[dict[str, Any]]:
    return [
        {
            "cell": asdict(r.cell),
            "verdicts": r.verdicts(),
            "kernel_verdicts": r.kernel_verdicts(),
            "points": [asdict(p) for p in r.points],
        }
        for r in results
    ]


def grid_from_json(raw: Sequence[dict[str, Any]]) -> list[CellResult]:
    """The inverse of `grid_json`: results to render again (`run.py grid --render`)."""
    return [
        CellResult(
            Cell(**entry["cell"]),
            tuple(
                Point(
                    setting=point["setting"],
                    run=PolicyRun(**point["run"]),
                    node_cpu=point["node_cpu"],
                    round_rates=tuple(point["round_rates"]),
                )
                for point in entry["points"]
            ),
        )
        for entry in raw
    ]


def heatmap(results: Sequence[CellResult], path: Path) -> None:
    """rap req/s ÷ best static req/s per cell: rows state x connections, columns delay scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = sorted({r.cell.scale for r in results})
    rows = list(dict.fromkeys((r.cell.state, r.cell.connections) for r in results))
    values = [[math.nan] * len(scales) for _ in rows]
    for r in results:
        ratio = r.verdicts()["rap_vs_best"]
        if ratio is not None:
            values[rows.index((r.cell.state, r.cell.connections))][scales.index(r.cell.scale)] = (
                ratio
            )
    figure, ax = plt.subplots(figsize=(2.2 + 1.6 * len(scales), 1.2 + 0.5 * len(rows)))
    image = ax.imshow(values, cmap="RdYlGn", vmin=0.6, vmax=1.4, aspect="auto")
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            if not math.isnan(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=9)
    ax.set_xticks(range(len(scales)), [f"x{s:g}" for s in scales])
    ax.set_yticks(range(len(rows)), [f"{state}, c{c}" for state, c in rows])
    ax.set_xlabel("one-way delay scale (4/8/3 ms matrix x)")
    ax.set_title("rap req/s / best static policy's req/s (>= 1.00: target met)", fontsize=10)
    figure.colorbar(image, ax=ax, shrink=0.8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
