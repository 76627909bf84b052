"""The pure parts of idempotency keys (agent.idempotency): which keys are valid, what
makes two requests differ, and which records a write prunes."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from agent.http.openapi import build
from agent.http.routes import ROUTES
from agent.idempotency import MAX_KEY_CHARS, Once, check_key, differs, fair_victims, prune_plan

_DOCUMENTED = build()["components"]["parameters"]["IdempotencyKey"]["schema"]
PRINTABLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)


@given(st.text(PRINTABLE, min_size=1, max_size=MAX_KEY_CHARS))
def test_printable_ascii_keys_up_to_200_are_valid(key: str) -> None:
    """Every key of 1..200 printable ASCII characters is accepted."""
    assert check_key(key) is None


@given(st.text(max_size=MAX_KEY_CHARS + 20))
def test_a_key_is_valid_only_if_printable_ascii_and_1_to_200(key: str) -> None:
    """Anything else (empty, longer, a control or non-ASCII character) says why not."""
    valid = 1 <= len(key) <= MAX_KEY_CHARS and all(" " <= c <= "~" for c in key)
    assert (check_key(key) is None) is valid


def _once(method: str, path: str, body: str) -> Once:
    return Once(scope="app", key="k", method=method, path=path, body=body,
                answer=lambda r: (200, r))


_parts = st.tuples(st.sampled_from(["POST", "PATCH", "DELETE"]), st.text(max_size=8),
                   st.text(max_size=8))


@given(_parts, _parts)
def test_differs_names_exactly_the_parts_that_differ(a: tuple[str, str, str],
                                                     b: tuple[str, str, str]) -> None:
    """method, path and body are compared one by one, named in that order."""
    stored = {"m": a[0], "p": a[1], "b": a[2]}
    got = differs(stored, _once(*b))
    assert got == [name for name, x, y in zip(("method", "path", "body"), a, b, strict=True)
                   if x != y]


@given(st.lists(st.integers(0, 1000), max_size=60).map(sorted),
       st.integers(0, 1100), st.integers(1, 50), st.integers(1, 10), st.integers(0, 20))
def test_prune_takes_the_oldest_expired_or_over_the_bound(
        times: list[int], cutoff: int, max_keys: int, batch: int, extra: int) -> None:
    """A prefix of the oldest, at most `batch`; every one taken is expired or over the
    bound; it stops only at the batch or at a record that is neither."""
    records = [(t, i) for i, t in enumerate(times)]
    count = len(records) + extra  # records the time index does not list (never negative)
    plan = prune_plan(count, records, cutoff, max_keys, batch)
    assert plan == [i for _, i in records[:len(plan)]]
    assert len(plan) <= batch
    for j, (t, _) in enumerate(records[:len(plan)]):
        assert t < cutoff or count - j > max_keys
    if len(plan) < min(batch, len(records)):
        t, _ = records[len(plan)]
        assert t >= cutoff and count - len(plan) <= max_keys


@given(st.text(max_size=MAX_KEY_CHARS + 20))
def test_the_documented_key_pattern_is_the_check(key: str) -> None:
    """docs/agent-api.openapi.json's Idempotency-Key schema accepts exactly the keys
    the agent accepts (a generated client validates with it)."""
    schema = _DOCUMENTED
    documented = (schema["minLength"] <= len(key) <= schema["maxLength"]
                  and re.fullmatch(schema["pattern"][1:-1], key) is not None)
    assert documented is (check_key(key) is None)


def test_every_write_route_documents_the_key() -> None:
    """The header and the replay marker are on every write route, on no read."""
    paths = build()["paths"]
    for route in ROUTES:
        op = paths[route.path][route.method.lower()]
        refs = [p.get("$ref") for p in op.get("parameters", [])]
        has = "#/components/parameters/IdempotencyKey" in refs
        assert has is route.writes, route.op_id
        if has:
            assert "Idempotent-Replayed" in op["responses"][str(route.status)]["headers"]
    writes = {r.op_id for r in ROUTES if r.writes}
    assert writes == {"putFields", "deleteRecord", "increment", "addMembers", "removeMembers",
                      "resolveConflict", "transaction", "retryDeadLetter",
                      "discardDeadLetter"}


@given(st.dictionaries(st.binary(min_size=8, max_size=8), st.integers(0, 40), max_size=6),
       st.integers(0, 120))
def test_the_fair_bound_takes_from_the_app_holding_the_most(
        counts: dict[bytes, int], n: int) -> None:
    """`n` keys are taken (or every key, if fewer), only from apps holding some; after
    each, no app holds more than any app that lost one did before (max-min fair)."""
    victims = fair_victims(counts, n)
    assert len(victims) == min(n, sum(counts.values()))
    held = dict(counts)
    for tag in victims:
        assert held[tag] > 0
        assert held[tag] == max(held.values())  # nobody held more than the one losing one
        held[tag] -= 1
    left = {tag: c for tag, c in held.items() if c}
    if left and victims:  # what stays is as even as the taking could make it
        assert max(left.values()) <= min(held[t] for t in set(victims)) + 1
