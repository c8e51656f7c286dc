"""RapRuntime: this node's samples reach the tracker, and overload changes are logged."""

from __future__ import annotations

import logging

import pytest

from rapproxy.config import from_mapping
from rapproxy.model.telemetry import NodeStats
from rapproxy.telemetry.runtime import RapRuntime


def test_a_change_of_the_nodes_overloaded_state_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rap = RapRuntime(from_mapping({}), "n0")
    caplog.set_level(logging.INFO, logger="rapproxy.telemetry.runtime")
    rap.record_local(NodeStats("n0", 0.2, 0.2, 1.0))
    rap.record_local(NodeStats("n0", 0.95, 0.2, 2.0))
    rap.record_local(NodeStats("n0", 0.97, 0.2, 3.0))
    rap.record_local(NodeStats("n0", 0.1, 0.2, 4.0))
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "this node is overloaded (cpu 0.95, memory 0.20)",
        "this node is no longer overloaded (cpu 0.10, memory 0.20)",
    ]
    assert rap.tracker.snapshot().nodes["n0"].stats == NodeStats("n0", 0.1, 0.2, 4.0)
