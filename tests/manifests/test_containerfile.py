"""The Containerfile lints clean, and its entrypoint and the token script do what the docs say.

The image cannot be built here (no container engine), so the pieces that run inside it are run
directly: the entrypoint's iptables backend choice against this machine's real iptables (root),
and the operator's token generator on a copy of itself.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"
CONTAINERFILE = REPO / "Containerfile"
ENTRYPOINT = REPO / "container" / "rapproxy-entrypoint"
TOKEN_SCRIPT = MANIFESTS / "base" / "generate-telemetry-token"


def test_hadolint_finds_nothing(hadolint: str) -> None:
    result = subprocess.run(
        [hadolint, "--config", str(REPO / ".hadolint.yaml"), str(CONTAINERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def final_stage() -> str:
    return re.split(r"^FROM ", CONTAINERFILE.read_text(encoding="utf-8"), flags=re.M)[-1]


def test_image_runs_as_an_unprivileged_user_by_default() -> None:
    (user,) = re.findall(r"^USER (\S+)$", final_stage(), flags=re.M)
    assert user.split(":")[0] not in ("0", "root")


def test_image_is_python_slim_with_the_tools_the_proxy_drives() -> None:
    text = CONTAINERFILE.read_text(encoding="utf-8")
    assert re.search(r"^ARG PYTHON_IMAGE=\S*python:3\.11-slim", text, flags=re.M)
    assert text.count("FROM ${PYTHON_IMAGE}") == 2, "a builder stage and a runtime stage"
    install = re.search(r"apt-get install[^&]*", final_stage())
    assert install is not None
    assert {"iptables", "conntrack", "iproute2"} <= set(install.group(0).split())
    assert "org.opencontainers.image.version" in final_stage()
    assert 'ENTRYPOINT ["/usr/local/bin/rapproxy-entrypoint"]' in final_stage()


def test_entrypoint_is_executable_and_valid_sh() -> None:
    assert ENTRYPOINT.stat().st_mode & stat.S_IXUSR
    subprocess.run(["sh", "-n", str(ENTRYPOINT)], check=True)


def run_entrypoint(tmp_path: Path, *command: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The entrypoint with a stand-in `rapproxy` that reports which iptables it would run."""
    fake_bin = tmp_path / "fake-bin"
    fake_bin.mkdir(exist_ok=True)
    fake = fake_bin / "rapproxy"
    fake.write_text(
        '#!/bin/sh\nreadlink "$(command -v iptables-restore)"\niptables-save -t nat >/dev/null\n'
    )
    fake.chmod(0o755)
    environment = {
        "PATH": f"{fake_bin}:{os.environ['PATH']}",
        "RAPPROXY_RUNTIME_DIR": str(tmp_path / "run"),
        **env,
    }
    return subprocess.run(
        [str(ENTRYPOINT), *command],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.root
def test_entrypoint_links_the_detected_iptables_backend_before_running_rapproxy(
    tmp_path: Path,
) -> None:
    result = run_entrypoint(tmp_path, "rapproxy", "run")
    assert result.returncode == 0, result.stderr
    (backend,) = re.findall(r"iptables backend: (nft|legacy) ", result.stderr)
    assert result.stdout.strip() == shutil.which(f"xtables-{backend}-multi")


@pytest.mark.root
@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_entrypoint_honours_an_explicit_backend(tmp_path: Path, backend: str) -> None:
    result = run_entrypoint(tmp_path, "rapproxy", "run", IPTABLES_BACKEND=backend)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == shutil.which(f"xtables-{backend}-multi")


@pytest.mark.root
def test_entrypoint_rejects_an_unknown_backend(tmp_path: Path) -> None:
    result = run_entrypoint(tmp_path, "rapproxy", "run", IPTABLES_BACKEND="nftables")
    assert result.returncode == 64
    assert "expected nft, legacy or auto" in result.stderr


def test_entrypoint_runs_other_commands_unchanged(tmp_path: Path) -> None:
    result = run_entrypoint(tmp_path, "sh", "-c", 'echo "$PATH"')
    assert result.returncode == 0, result.stderr
    assert "rapproxy/bin" not in result.stdout
    assert not (tmp_path / "run").exists()


def test_entrypoint_refuses_the_placeholder_api_server_address(tmp_path: Path) -> None:
    result = run_entrypoint(
        tmp_path, "rapproxy", "run", KUBERNETES_SERVICE_HOST="set-your-apiserver-address.invalid"
    )
    assert result.returncode == 78
    assert "apiserver.env" in result.stderr


def test_token_script_writes_a_private_random_token_once(tmp_path: Path) -> None:
    script = tmp_path / TOKEN_SCRIPT.name
    shutil.copy2(TOKEN_SCRIPT, script)
    token_file = tmp_path / "telemetry-token"

    subprocess.run([str(script)], check=True, capture_output=True)
    first = token_file.read_text()
    assert re.fullmatch(r"[0-9a-f]{64}", first)
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600

    subprocess.run([str(script)], check=True, capture_output=True)
    assert token_file.read_text() == first, "re-running must keep the token"

    subprocess.run([str(script), "--rotate"], check=True, capture_output=True)
    assert token_file.read_text() != first
