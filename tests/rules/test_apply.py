"""How `IptablesRunner` reports failures, driven with stand-in commands (no root needed).

The stand-ins are real executables (small shell scripts), so the subprocess handling is
exercised for real; what iptables itself accepts is tested in tests/netns.
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from rapproxy.rules.apply import IptablesError, IptablesRunner
from rapproxy.rules.backend import Backend, IptablesTools
from rapproxy.rules.render import RuleConfig


def script(directory: Path, name: str, body: str) -> str:
    path = directory / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def runner(
    tmp_path: Path, save_body: str, restore_body: str, timeout: float = 10
) -> IptablesRunner:
    tools = IptablesTools(
        backend=Backend.NFT,
        family=4,
        save=script(tmp_path, "fake-save", save_body),
        restore=script(tmp_path, "fake-restore", restore_body),
    )
    return IptablesRunner(tools, timeout=timeout)


async def test_restore_passes_noflush_wait_and_the_text_on_stdin(tmp_path: Path) -> None:
    seen = tmp_path / "seen"
    fake = runner(tmp_path, "true\n", f'echo "$@" > {seen}.args\ncat > {seen}.stdin\n')
    await fake.restore("*nat\nCOMMIT\n")
    assert (tmp_path / "seen.args").read_text() == "--noflush --wait=5\n"
    assert (tmp_path / "seen.stdin").read_text() == "*nat\nCOMMIT\n"


async def test_empty_transaction_runs_nothing(tmp_path: Path) -> None:
    fake = runner(tmp_path, "true\n", "exit 1\n")
    await fake.restore("")


async def test_failure_carries_stderr_and_the_rejected_line(tmp_path: Path) -> None:
    fake = runner(
        tmp_path, "true\n", 'cat >/dev/null\necho "iptables-restore: line 2 failed" >&2\nexit 1\n'
    )
    with pytest.raises(IptablesError) as caught:
        await fake.restore("*nat\n-A NOPE -j RETURN\nCOMMIT\n")
    assert caught.value.returncode == 1
    assert caught.value.failed_line == "-A NOPE -j RETURN"
    assert "line 2 failed" in str(caught.value)
    assert "rejected line: -A NOPE -j RETURN" in str(caught.value)


async def test_a_hung_command_is_killed_and_reported(tmp_path: Path) -> None:
    fake = runner(tmp_path, "exec sleep 30\n", "true\n", timeout=0.3)
    with pytest.raises(IptablesError, match="timed out"):
        await fake.save()


async def test_sync_without_repair_does_not_read_the_table(tmp_path: Path) -> None:
    fake = runner(tmp_path, "exit 7\n", "cat >/dev/null\n")
    await fake.sync([], RuleConfig(), repair_jumps=False)
    with pytest.raises(IptablesError, match="exited 7"):
        await fake.sync([], RuleConfig())


async def test_an_unchanged_sync_runs_nothing_unless_asked_to_repair(tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    fake = runner(tmp_path, "true\n", f"cat >/dev/null\necho restore >> {calls}\n")
    assert await fake.sync([], RuleConfig(), repair_jumps=False) is True
    assert await fake.sync([], RuleConfig(), repair_jumps=False) is False
    assert await fake.sync([], RuleConfig(localhost_nodeports=True), repair_jumps=False) is True
    assert await fake.sync([], RuleConfig(localhost_nodeports=True)) is True
    assert calls.read_text().count("restore") == 3


async def test_a_failed_sync_is_retried_in_full_next_time(tmp_path: Path) -> None:
    flag = tmp_path / "fail"
    flag.write_text("")
    fake = runner(tmp_path, "true\n", f"cat >/dev/null\ntest -e {flag} && exit 1\nexit 0\n")
    with pytest.raises(IptablesError):
        await fake.sync([], RuleConfig(), repair_jumps=False)
    flag.unlink()
    assert await fake.sync([], RuleConfig(), repair_jumps=False) is True
