"""The meaning of a query, written independently of the index code: Python comparisons on
the views' values. The tests hold the agent's indexed answers against this."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

from agent.view import ViewState

_RANK = {"null": 0, "bool": 1, "number": 2, "string": 3, "other": 4}


def kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "other"


def compare(a: Any, b: Any) -> int:
    """-1, 0, 1: kinds in the order null < bool < number < string < other, then values
    (Python compares ints and floats exactly, and strings by code point)."""
    ka, kb = kind(a), kind(b)
    if ka != kb:
        return -1 if _RANK[ka] < _RANK[kb] else 1
    if ka in ("null", "other"):
        return 0
    if a == b:
        return 0
    return -1 if a < b else 1


def value(view: ViewState, name: str) -> Any:
    if name == "$scope":
        return view.s
    if view.x:
        return None
    return view.f.get(name)


def _holds(v: Any, op: str, arg: Any) -> bool:
    if op == "eq":
        return compare(v, arg) == 0
    if op == "in":
        return any(compare(v, a) == 0 for a in arg)
    if op == "prefix":
        return isinstance(v, str) and v.startswith(arg)
    if kind(v) != kind(arg):
        return False
    c = compare(v, arg)
    return {"gt": c > 0, "gte": c >= 0, "lt": c < 0, "lte": c <= 0}[op]


def field_matches(v: Any, ops: Mapping[str, Any]) -> bool:
    if isinstance(v, list):  # a set field: some member satisfies every condition
        return any(all(_holds(m, op, arg) for op, arg in ops.items()) for m in v)
    return all(_holds(v, op, arg) for op, arg in ops.items())


def matches(view: ViewState, where: Mapping[str, Mapping[str, Any]],
            include_deleted: bool = False) -> bool:
    if view.x and not include_deleted:
        return False
    return all(field_matches(value(view, name), ops) for name, ops in where.items())


def select(views: Iterable[ViewState], where: Mapping[str, Mapping[str, Any]],
           include_deleted: bool = False) -> list[ViewState]:
    return [v for v in views if matches(v, where, include_deleted)]


def sort_key(name: str) -> Any:
    return functools.cmp_to_key(lambda a, b: compare(value(a, name), value(b, name)))


__all__ = ["compare", "field_matches", "kind", "matches", "select", "sort_key", "value"]
