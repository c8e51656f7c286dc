"""The rapproxy command: sub-commands parse as documented and bad input is one clear line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rapproxy import __version__
from rapproxy.cli import main
from rapproxy.config import from_yaml

RAPPROXY = str(Path(sys.executable).with_name("rapproxy"))


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["version"]) == 0
    assert capsys.readouterr().out.strip() == f"rapproxy {__version__}"


def test_print_defaults_is_a_valid_configuration(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--print-defaults"]) == 0
    text = capsys.readouterr().out
    assert yaml.safe_load(text)["kind"] == "RapproxyConfiguration"
    from_yaml(text)


def test_validate_accepts_flags_and_rejects_bad_settings(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["run", "--validate", "--lb-policy", "least-conn"]) == 0
    assert main(["run", "--validate", "--set", "rap.overloadThreshold=1.5"]) == 2
    assert "rap.overloadThreshold" in capsys.readouterr().err


def test_bad_config_file_is_one_line_naming_the_field(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("proxy:\n  tcpPrt: 1\n")
    done = subprocess.run(
        [RAPPROXY, "run", "--validate", "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "proxy.tcpPrt: unknown field" in done.stderr
    assert "Traceback" not in done.stderr


def test_bps_wait_takes_its_own_leading_options(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("")
    done = subprocess.run(
        [RAPPROXY, "bps-wait", "--port", "0", "--timeout", "1", "--token-file", str(token)],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert "unrecognized arguments" not in done.stderr
    assert done.returncode == 2 and "no token" in done.stderr
