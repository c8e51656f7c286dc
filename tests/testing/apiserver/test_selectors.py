"""Label and field selector parsing and matching."""

from __future__ import annotations

import pytest

from rapproxy.testing.apiserver.selectors import (
    SelectorError,
    parse_field_selector,
    selector_predicate,
)

OBJ = {
    "metadata": {"name": "a", "namespace": "ns", "labels": {"app": "web", "tier": "fe"}},
    "spec": {"nodeName": "n1"},
}


@pytest.mark.parametrize(
    ("selector", "matches"),
    [
        ("app=web", True),
        ("app==web", True),
        ("app!=web", False),
        ("app!=db", True),
        ("tier in (fe,be)", True),
        ("tier notin (fe)", False),
        ("missing notin (x)", True),
        ("app", True),
        ("!app", False),
        ("!canary", True),
        ("app=web,tier in (be)", False),
        ("app=web, tier=fe", True),
    ],
)
def test_label_selector_operators(selector: str, matches: bool) -> None:
    assert selector_predicate(selector, None, ("metadata.name",))(OBJ) is matches


@pytest.mark.parametrize("bad", ["app in web", "app in (web", "=web", "app=web tier"])
def test_malformed_label_selectors_are_rejected(bad: str) -> None:
    with pytest.raises(SelectorError):
        selector_predicate(bad, None, ())


def test_malformed_in_reports_the_servers_message() -> None:
    with pytest.raises(
        SelectorError, match="unable to parse requirement: found 'web' expected: '\\('"
    ):
        selector_predicate("app in web", None, ())


def test_field_selectors_match_and_unknown_fields_are_refused_like_the_server() -> None:
    allowed = ("metadata.name", "metadata.namespace", "spec.nodeName")
    assert selector_predicate(None, "spec.nodeName=n1,metadata.name!=b", allowed)(OBJ)
    assert not selector_predicate(None, "metadata.namespace=other", allowed)(OBJ)
    with pytest.raises(SelectorError) as raised:
        parse_field_selector("spec.clusterIP=1", ("metadata.name", "metadata.namespace"))
    assert str(raised.value) == (
        '"spec.clusterIP" is not a known field selector: only "metadata.name", "metadata.namespace"'
    )
