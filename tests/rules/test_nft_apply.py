"""NftRunner's reading of nft's answers, with a stand-in `nft` script (no kernel needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rapproxy.rules.nft_apply import NftError, NftRunner


def fake_nft(tmp_path: Path, stderr: str, status: int) -> str:
    script = tmp_path / "nft"
    script.write_text(f"#!/bin/sh\ncat >/dev/null\nprintf '%s\\n' '{stderr}' >&2\nexit {status}\n")
    script.chmod(0o755)
    return str(script)


async def test_only_no_such_table_reads_as_gone_any_other_failure_is_raised(
    tmp_path: Path,
) -> None:
    gone = NftRunner(4, command=fake_nft(tmp_path, "Error: No such file or directory", 1))
    assert not await gone.cleanup()  # not there: nothing to remove
    busy_dir = tmp_path / "busy"
    busy_dir.mkdir()
    busy = NftRunner(4, command=fake_nft(busy_dir, "Error: Device or resource busy", 1))
    with pytest.raises(NftError, match="busy"):  # never a rebuild on a transient failure
        await busy.cleanup()
