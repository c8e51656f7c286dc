"""The compiled relay (`make compile`, Cython) is the current source, and is the one imported.

Python imports `tcp.<EXT_SUFFIX>` before `tcp.py`, so an extension left over from an older
source would silently run old code under every other test. CI (CI=1) must run the compiled
relay, since that is what `make install` builds and what the benchmarks measure.
"""

from __future__ import annotations

import importlib.machinery
import os
import sysconfig
from pathlib import Path

import pytest

from rapproxy.dataplane import tcp

SOURCE = Path(tcp.__file__).with_name("tcp.py")
EXTENSION = SOURCE.with_name("tcp" + str(sysconfig.get_config_var("EXT_SUFFIX")))


def test_an_extension_beside_the_relay_is_built_from_its_current_source() -> None:
    if not EXTENSION.exists():
        pytest.skip("no compiled relay (`make compile`); the pure-Python relay runs")
    assert EXTENSION.stat().st_mtime >= SOURCE.stat().st_mtime, (
        f"{EXTENSION.name} is older than tcp.py: run `make compile` (or `make pure`)"
    )
    assert Path(tcp.__file__) == EXTENSION, "the extension is what `import` picks"
    assert isinstance(tcp.__loader__, importlib.machinery.ExtensionFileLoader)


def test_ci_runs_the_compiled_relay() -> None:
    if not os.environ.get("CI"):
        pytest.skip("outside CI the pure-Python relay is allowed")
    assert Path(tcp.__file__) == EXTENSION, "make install should have compiled the relay"
