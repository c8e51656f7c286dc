"""docs/configuration.md is generated from the configuration model and must never drift from it."""

from __future__ import annotations

from pathlib import Path

import yaml

from rapproxy import config
from rapproxy.config_reference import REGENERATE_COMMAND, render_reference

COMMITTED = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def test_committed_reference_equals_the_rendering_of_the_model() -> None:
    committed = COMMITTED.read_text(encoding="utf-8") if COMMITTED.exists() else ""
    assert committed == render_reference(), (
        f"docs/configuration.md is out of date with rapproxy/config.py; run: {REGENERATE_COMMAND}"
    )


def test_every_setting_appears_with_its_environment_variable_and_default() -> None:
    rendered = render_reference()
    rows = {line.split("|")[1].strip(): line for line in rendered.splitlines() if "| `" in line}
    for variable, path in config.env_variable_names().items():
        assert f"`{path}`" in rows, f"{path} is missing from the reference"
        assert f"`{variable}`" in rows[f"`{path}`"]
    for path, default, _meaning in config.reference_rows():
        assert default in rows[f"`{path}`"]


def test_reference_tells_how_to_regenerate_it() -> None:
    assert REGENERATE_COMMAND in render_reference().splitlines()[1]


def test_angle_brackets_in_meanings_survive_markdown_rendering() -> None:
    row = next(line for line in render_reference().splitlines() if "`serviceProxyName`" in line)
    assert "service-proxy-name=&lt;this&gt;" in row


def test_embedded_defaults_load_back_to_the_default_configuration() -> None:
    rendered = render_reference()
    block = rendered.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert config.from_mapping(yaml.safe_load(block)) == config.RapproxyConfiguration()
