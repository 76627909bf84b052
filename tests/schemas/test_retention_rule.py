"""The retention rule of a collection (schemas.retention): parsing and the pure decision."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.collection import parse_catalog
from schemas.errors import CollectionSchemaError
from schemas.evolution import diff
from schemas.retention import MAX_AFTER_S, RetentionRule, evictable, parse_duration_s


def _catalog(retention: Any, version: int = 1) -> Any:
    return parse_catalog({"version": version, "collections": {"tasks": {
        "scope_field": "route", "retention": retention,
        "fields": {"route": {"type": "string"}, "status": {"type": "string"},
                   "n": {"type": "int"}, "ok": {"type": "bool"}}}}})


@pytest.mark.parametrize(("raw", "seconds"), [
    (0, 0), (90, 90), ("90s", 90), ("30m", 1800), ("12h", 43_200), ("7d", 604_800),
    (" 7d ", 604_800), ("5", 5)])
def test_durations(raw: Any, seconds: int) -> None:
    """Durations are seconds or a number with s / m / h / d."""
    assert parse_duration_s(raw) == seconds


@pytest.mark.parametrize("raw", [
    "7w", "-1d", "1.5d", "", "d", "7 days", True, 1.5, None, [], -1, MAX_AFTER_S + 1,
    "99999999999d", "7d\n7d"])
def test_bad_durations_are_refused(raw: Any) -> None:
    """Anything else is refused with a message saying what a duration looks like."""
    with pytest.raises(ValueError, match="duration"):
        parse_duration_s(raw)


def test_schema_declares_retention() -> None:
    """A collection's retention table is read with the schema."""
    cat = _catalog({"after": "7d", "when": {"status": ["delivered", "failed"]}})
    rule = cat.collections["tasks"].retention
    assert rule is not None and rule.after == 604_800
    assert rule.when == {"status": ("delivered", "failed")}


@pytest.mark.parametrize(("retention", "message"), [
    ({"after": "7w"}, "duration"),
    ({}, "after"),
    ({"after": "1d", "when": {"nope": ["x"]}}, "not one of the fields"),
    ({"after": "1d", "when": {"status": []}}, "non-empty"),
    ({"after": "1d", "when": {"status": "delivered"}}, "non-empty list"),
    ({"after": "1d", "when": {"status": [1.5]}}, "strings, integers and bools"),
    ({"after": "1d", "when": {"status": [{"a": 1}]}}, "strings, integers and bools"),
    ({"after": "1d", "when": {"status": ["x"] * 65}}, "more than 64"),
    ({"after": "1d", "when": ["status"]}, "table"),
    ({"after": "1d", "evict": True}, "unknown key"),
    ("7d", "retention"),
])
def test_bad_retention_is_refused(retention: Any, message: str) -> None:
    """A wrong retention table names the collection and what is wrong."""
    with pytest.raises(CollectionSchemaError, match="tasks") as err:
        _catalog(retention)
    assert message in str(err.value)


def test_changing_retention_is_a_compatible_change() -> None:
    """Retention is local to devices: a new or changed rule never breaks a version."""
    old = _catalog(None)
    new = _catalog({"after": "1d"}, version=2)
    diffs = diff(old, new)
    assert [d.kind for d in diffs] == ["retention"]
    assert all(d.compatible for d in diffs)


values = st.one_of(st.text(max_size=5), st.integers(-3, 3), st.booleans(), st.none())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(after=st.integers(0, 10**6), synced=st.integers(0, 10**12), age=st.integers(-10**9, 10**10),
       fields=st.dictionaries(st.sampled_from(["status", "n", "ok"]), values),
       when=st.dictionaries(st.sampled_from(["status", "n", "ok"]),
                            st.lists(st.one_of(st.text(max_size=5), st.integers(-3, 3),
                                               st.booleans()), min_size=1, max_size=3)),
       deleted=st.booleans(), pending=st.booleans(), conflicted=st.booleans(),
       pressure=st.booleans())
def test_evictable_rule(after: int, synced: int, age: int, fields: dict[str, Any],
                        when: dict[str, list[Any]], deleted: bool, pending: bool,
                        conflicted: bool, pressure: bool) -> None:
    """Never pending or conflicted records; otherwise: of the declared kind (or deleted),
    and old enough unless the quota presses; a bool never matches an int."""
    rule = RetentionRule.model_validate({"after": after, "when": when})
    now = synced + age
    got = evictable(rule, fields, deleted, synced, now, pending=pending,
                    conflicted=conflicted, pressure=pressure)
    kind = deleted or all(
        any(type(fields.get(f)) is type(v) and fields.get(f) == v for v in allowed)
        for f, allowed in when.items())
    old_enough = age >= after * 1000
    assert got == (not pending and not conflicted and kind and (pressure or old_enough))
    if got and not pressure:
        # Monotone in time: what may be evicted now may be evicted later too.
        assert evictable(rule, fields, deleted, synced, now + 1, pending=False,
                         conflicted=False)


def test_bool_never_matches_int() -> None:
    """`when = { ok = [1] }` does not match ok = true (JSON keeps them apart)."""
    rule = RetentionRule.model_validate({"after": 0, "when": {"ok": [1]}})
    assert not rule.matches({"ok": True}, False)
    assert rule.matches({"ok": 1}, False)
