"""wrk's summary is parsed from its Lua hook, and a run without one is a clear error."""

from __future__ import annotations

import pytest

from rapproxy.testing.load import LoadError, median, parse_wrk, wrk_argv

LINE = (
    'WRKJSON {"requests":1200,"bytes":9000,"duration_us":2000000,"connect_errors":1,'
    '"read_errors":0,"write_errors":0,"status_errors":2,"timeouts":3,"p50_us":1500,'
    '"p90_us":2500,"p99_us":9000,"max_us":12000,"mean_us":1700.0}'
)


def test_summary_line_is_parsed_among_other_output() -> None:
    result = parse_wrk("Running 2s test\n" + LINE + "\n")
    assert result.requests == 1200
    assert result.rate == 600.0
    assert result.errors == 6
    assert (result.p50_ms, result.p99_ms) == (1.5, 9.0)


def test_missing_summary_names_what_wrk_said() -> None:
    with pytest.raises(LoadError, match="unable to connect"):
        parse_wrk("", "unable to connect to 10.96.0.10:80")


def test_argv_rounds_duration_and_adds_close_header(tmp_path) -> None:  # type: ignore[no-untyped-def]
    argv = wrk_argv(
        "http://10.96.0.10/", tmp_path / "x.lua", duration=2.6, connections=8, close=True
    )
    assert "-d3s" in argv and "-c8" in argv
    assert argv[-3:] == ["-H", "Connection: close", "http://10.96.0.10/"]


def test_median() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 2.0, 3.0]) == 2.5
    assert median([]) == 0.0
