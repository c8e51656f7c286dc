"""`rapproxy demo`'s flags: defaults, the quick mode, and errors that name the flag."""

from __future__ import annotations

import pytest

from rapproxy.demo.options import POLICIES, DemoOptionError, parse_options, policy_and_dataplane


def test_defaults_scale_the_first_authors_matrix_and_compare_every_policy() -> None:
    options = parse_options([])
    assert options.policies == POLICIES
    assert options.delays_ms() == {
        ("node-1", "node-2"): 10.0,
        ("node-1", "node-3"): 20.0,
        ("node-2", "node-3"): 7.5,
    }
    assert (options.duration, options.rounds) == (5.0, 3)
    assert (options.overload, options.failover) == (True, True)


def test_quick_shortens_the_load_unless_a_duration_is_given() -> None:
    assert (parse_options(["--quick"]).duration, parse_options(["--quick"]).rounds) == (3.0, 1)
    assert parse_options(["--quick", "--duration", "5"]).duration == 5.0
    assert parse_options(["--quick", "--rounds", "2"]).rounds == 2


def test_policies_subset_and_phase_switches() -> None:
    options = parse_options(["--policies", "rap, local-only", "--no-overload", "--no-failover"])
    assert options.policies == ("rap", "local-only")
    assert not options.overload and not options.failover


def test_kernel_variants_are_a_policy_in_the_kernel_data_plane() -> None:
    assert parse_options(["--policies", "rap-kernel,random-kernel"]).policies == (
        "rap-kernel",
        "random-kernel",
    )
    assert policy_and_dataplane("rap-kernel") == ("rap", "kernel")
    assert policy_and_dataplane("random-kernel") == ("random", "kernel")
    assert policy_and_dataplane("rap") == ("rap", "userspace")
    assert policy_and_dataplane("rap-aimd") == ("rap-aimd", "userspace")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--duration", "0.5"], "--duration: 0.5 s is outside 1..600"),
        (["--rounds", "0"], "--rounds: 0 is outside 1..9"),
        (["--delay-scale", "-1"], "--delay-scale: -1 is outside 0..50"),
        (["--connections", "0"], "--connections: 0 is outside 1..512"),
        (["--node-cpus", "0"], "--node-cpus: 0 is outside 0.05..64"),
        (["--policies", "rap,fastest"], "--policies: ['fastest'] not among"),
        (["--policies", ","], "--policies: none not among"),
    ],
)
def test_bad_values_are_refused_naming_the_flag(argv: list[str], message: str) -> None:
    with pytest.raises(
        DemoOptionError, match="^" + message.replace("[", r"\[").replace("]", r"\]")
    ):
        parse_options(argv)
