"""The configuration reference (docs/configuration.md), rendered from the configuration model.

The reference is generated, never written by hand, so that it cannot disagree with the defaults and
meanings the code actually has: every row comes from `rapproxy.config.reference_rows()` (the
`doc` each field carries) and `env_variable_names()`. A test compares this rendering with the
committed file and fails on drift.

Regenerate with:  python -m rapproxy.config_reference > docs/configuration.md

Pure: builds a string; only the `__main__` block writes to stdout.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from typing import Any

from rapproxy import config

REGENERATE_COMMAND = "python -m rapproxy.config_reference > docs/configuration.md"


def _section_meanings(
    cls: type[Any] = config.RapproxyConfiguration, prefix: str = ""
) -> dict[str, str]:
    """Field path of every nested section → its `doc` (e.g. "rap.weights" → "Score weights.")."""
    meanings: dict[str, str] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            path = f"{prefix}.{config.camel(f.name)}" if prefix else config.camel(f.name)
            meanings[path] = str(f.metadata.get("doc", ""))
            meanings.update(_section_meanings(hint, path))
    return meanings


def _cell(text: str) -> str:
    """Text made safe for one Markdown table cell (`<this>` would otherwise vanish as a tag)."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;").replace("\n", " ")


def render_reference() -> str:
    """docs/configuration.md: every setting with its default, environment variable and meaning."""
    env_by_path = {path: variable for variable, path in config.env_variable_names().items()}
    section_meanings = _section_meanings()
    sections: dict[str, list[tuple[str, str, str]]] = {}
    for path, default, meaning in config.reference_rows():
        parent = path.rpartition(".")[0]
        sections.setdefault(parent, []).append((path, default, meaning))

    lines = [
        "<!-- Generated from rapproxy/config.py; do not edit by hand. Regenerate with:",
        f"     {REGENERATE_COMMAND} -->",
        "",
        "# Configuration reference",
        "",
        f"rapproxy reads one `{config.KIND}` document (`apiVersion: {config.API_VERSION}`), "
        "given with `rapproxy run --config FILE`. Three sources are merged, later ones winning:",
        "",
        "1. the YAML file;",
        "2. `RAPPROXY_*` environment variables (the field path in upper snake case, listed below);",
        "3. `--set path=value` flags, e.g. `--set rap.overloadThreshold=0.9`.",
        "",
        "The whole result is validated before anything starts; an invalid setting is reported "
        "with its field path. Durations (every setting measured in seconds) accept a number of "
        "seconds or a Go-style duration such as `500ms`, `1s` or `1m30s`. Lists given as an "
        "environment variable or `--set` value are comma-separated. "
        "`rapproxy run --print-defaults` prints the defaults below as YAML.",
        "",
        "Field names mirror kube-proxy's `KubeProxyConfiguration` where the two overlap.",
    ]
    for parent, rows in sections.items():
        title = f"`{parent}`" if parent else "Top level"
        lines += ["", f"## {title}", ""]
        if parent:
            lines += [section_meanings.get(parent, ""), ""]
        lines += [
            "| Field | Default | Environment variable | Meaning |",
            "|---|---|---|---|",
        ]
        for path, default, meaning in rows:
            lines.append(
                f"| `{path}` | {_cell(default)} | `{env_by_path[path]}` | {_cell(meaning)} |"
            )
    lines += [
        "",
        "## All defaults as YAML",
        "",
        "```yaml",
        config.defaults_yaml().rstrip("\n"),
        "```",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(render_reference())
