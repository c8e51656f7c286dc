"""`rapproxy demo`: try RAP and the BackupPodSet controller without a cluster.

The demo builds the emulated edge cluster of design §5 (nodes as namespaces behind a WAN with
userspace delay, pods as real processes, the emulated API server), runs the real `rapproxy run`
on every node, compares the balancing policies under load, fails a primary over, prints the
results, writes them (text, Markdown, JSON, a PNG chart) and removes everything it made.

This module is the command's shell: flags, the root and tool checks a newcomer would otherwise
meet as a traceback, and where the results go. The story itself is `scenario`; the cluster is
`cluster`; the presentation is `report`. It lives outside `rapproxy.testing` because it is a
user-facing command, but it is built only from the emulators there and never imported by the
daemon (import-linter keeps it so).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rapproxy.demo.options import DemoOptionError, DemoOptions, parse_options

EXIT_USAGE = 2
EXIT_FAILED = 1
REQUIRED_TOOLS = ("ip", "iptables", "iptables-restore", "wrk")


def missing_tools() -> list[str]:
    return [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]


def output_directory(options: DemoOptions) -> Path:
    if options.output is not None:
        return options.output
    return Path.cwd() / "demo-results" / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def main(argv: Sequence[str]) -> int:
    try:
        options = parse_options(argv)
    except DemoOptionError as error:
        print(f"rapproxy demo: {error}", file=sys.stderr)
        return EXIT_USAGE
    if os.geteuid() != 0:
        print(
            "rapproxy demo: needs root — it creates network namespaces, a TUN device, cgroups "
            "and iptables rules (all removed at the end). Run it as root, e.g. `sudo make demo`.",
            file=sys.stderr,
        )
        return EXIT_FAILED
    missing = missing_tools()
    if missing:
        print(
            f"rapproxy demo: missing {', '.join(missing)} — install the Debian packages with "
            "`make deps` (iptables, iproute2, wrk).",
            file=sys.stderr,
        )
        return EXIT_FAILED
    from rapproxy.demo import report
    from rapproxy.demo.cluster import DemoSetupError
    from rapproxy.demo.progress import Progress
    from rapproxy.demo.scenario import run_scenario

    progress = Progress()
    progress.say(
        "rapproxy demo: an emulated 3-node edge cluster on this machine (closed world of "
        "network namespaces; nothing leaves it)"
    )
    try:
        results = asyncio.run(run_scenario(options, progress))
    except KeyboardInterrupt:
        print("rapproxy demo: interrupted; everything it made has been removed", file=sys.stderr)
        return 130
    except DemoSetupError as error:
        print(f"rapproxy demo: {error}", file=sys.stderr)
        return EXIT_FAILED
    summary = report.summary_text(results)
    print()
    print(summary, end="")
    directory = output_directory(options)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "summary.txt").write_text(summary)
    (directory / "results.md").write_text(report.to_markdown(results))
    (directory / "results.json").write_text(report.to_json(results))
    chart = report.write_chart(results, directory / "comparison.png")
    print(f"\nresults: {directory}/ (summary.txt, results.md, results.json, {chart.name})")
    return EXIT_FAILED if any("LEFT BEHIND" in note for note in results.notes) else 0
