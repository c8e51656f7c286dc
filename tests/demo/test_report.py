"""The demo's presentation: the table's ratios, the saved documents and the chart."""

from __future__ import annotations

import json
from pathlib import Path

from rapproxy.demo.report import (
    DemoResults,
    FailoverResult,
    PolicyRun,
    comparison_table,
    summary_text,
    to_json,
    to_markdown,
    write_chart,
)

RUNS = (
    PolicyRun("healthy", "rap", 3000, 2.0, 0, 10.0, 20.0, 1.0),
    PolicyRun("healthy", "round-robin", 1000, 2.0, 1, 40.0, 60.0, 1 / 3),
    PolicyRun("overloaded", "rap", 600, 2.0, 0, 30.0, 90.0, None),
)
FAILOVER = FailoverResult("web-a", "node-1", "web-b", None, 0.2, 0.35, 12, 0)
RESULTS = DemoResults({"delays_ms": {"node-1-node-2": 10.0}}, RUNS, FAILOVER, ("a note",))


def test_table_gives_rates_and_ratios_against_baselines_of_the_same_phase() -> None:
    lines = comparison_table(RUNS).splitlines()
    rap, rr, overloaded = lines[1].split(), lines[2].split(), lines[3].split()
    # VS RR, VS LOCAL-ONLY, VS BEST STATIC (the best static here is round-robin itself)
    assert rap[:4] == ["healthy", "rap", "1500", "-"] and rap[-4:] == [
        "3.00x",
        "-",
        "3.00x",
        "(round-robin)",
    ]
    assert rr[-4:] == ["1.00x", "-", "1.00x", "(round-robin)"]  # no local-only run here
    assert overloaded[-3:] == ["-", "-", "-"]  # no baseline at all in that phase
    assert "closed-loop" in lines[-2]


def test_a_policy_within_the_best_static_policys_own_round_spread_is_level() -> None:
    runs = (
        PolicyRun("healthy", "rap", 970, 1.0, 0, 2.0, 5.0, 1.0, (980.0, 970.0, 940.0)),
        PolicyRun("healthy", "local-only", 1000, 1.0, 0, 2.0, 5.0, 1.0, (1000.0, 1020.0, 960.0)),
        PolicyRun("overloaded", "rap", 900, 1.0, 0, 2.0, 5.0, 0.2, (900.0, 910.0, 890.0)),
        PolicyRun("overloaded", "least-conn", 1000, 1.0, 0, 2.0, 5.0, 0.2, (990.0, 1000.0, 1010.0)),
    )
    lines = comparison_table(runs).splitlines()
    assert lines[1].split()[3] == "980/970/940"
    assert lines[1].endswith("0.97x (local-only) level")  # 970 >= local-only's slowest, 960
    assert lines[3].endswith("0.90x (least-conn)")  # 900 < 990: a real loss, not noise
    assert lines[2].endswith("1.00x (local-only)")  # a static policy is never called level


def test_summary_shows_the_failover_figures_beside_the_paper() -> None:
    text = summary_text(RESULTS)
    assert "kill -> first request served by promoted:  200 ms" in text
    assert "kill -> full set restored (BackupPodSet):  350 ms" in text
    assert "1.933 s" in text
    assert "note: a note" in text


def test_json_and_markdown_carry_the_same_numbers(tmp_path: Path) -> None:
    document = json.loads(to_json(RESULTS))
    assert [run["rate"] for run in document["runs"]] == [1500.0, 500.0, 300.0]
    assert document["failover"]["restored_s"] == 0.35
    markdown = to_markdown(RESULTS)
    assert "| healthy | rap | 1500 | 10.0 | 20.0 | 0 | 100 % |" in markdown


def test_chart_is_a_png(tmp_path: Path) -> None:
    path = write_chart(RESULTS, tmp_path / "out" / "chart.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000
