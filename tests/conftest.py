"""Suite-wide test policy: tests marked `root` skip, loudly, when not run as root.

Network namespaces and iptables need root. Here and in CI the suite runs as root and these tests
must pass; elsewhere they skip with a reason that says exactly why, so a green run as a normal
user is never mistaken for a full one (`pytest -ra` lists the skips).
"""

from __future__ import annotations

import os

import pytest

ROOT_SKIP_REASON = (
    "NEEDS ROOT: this test creates network namespaces and iptables rules; run the suite as root "
    "(CI does) to exercise it"
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip_root = pytest.mark.skip(reason=ROOT_SKIP_REASON)
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip_root)
