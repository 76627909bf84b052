"""The daemon's backoff for a change the server refused for now (a transient reject):
one delay per refusal, chosen before the store write, recorded in the last error and
kept by the daemon (`agent.retry_backoff`, `agent.daemon_receive._on_reject`)."""

from __future__ import annotations

import random
import time
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from agent.daemon import AgentDaemon
from agent.retry_backoff import retry_delay
from schemas import wire
from schemas.collection import example_catalog_path, load_catalog
from waystation.config import AgentConfig

CATALOG = load_catalog(example_catalog_path())
S = "route-42"


def _daemon(tmp_path: Path, initial: float, maximum: float, seed: int = 7) -> AgentDaemon:
    cfg = AgentConfig.model_validate({
        "device_id": "van-1", "data_dir": str(tmp_path / "agent"), "scopes": [S],
        "mqtt": {"port": 1, "password": "unused"},
        "sync": {"backoff_initial_s": initial, "backoff_max_s": maximum}})
    return AgentDaemon(cfg, CATALOG, env={}, rng=random.Random(seed))


def _held(n: int) -> wire.Reject:
    return wire.Reject(rj=[wire.Rejection(
        n=n, code="device_disabled", reason="device van-1 is disabled by the operator",
        perm=False)])


def test_a_refused_change_waits_the_backoff_its_last_error_promises(tmp_path: Path) -> None:
    """Each refusal counts one more try and sets one delay: the daemon's retry time and
    the store's `retry_at` are the same draw, within [initial, min(max, initial * 2^tries)]."""
    daemon = _daemon(tmp_path, 1.0, 60.0)
    try:
        daemon.agent.put("tasks", "t-1", {"route": S})
        for tries in (1, 2, 3):
            before = time.monotonic()
            daemon._on_reject(_held(1))
            after = time.monotonic()
            assert daemon.stats.extra["try:1"] == tries
            left = daemon.agent.status().last_error
            assert left is not None
            # the wait as the daemon keeps it, give or take the call's own duration
            low, high = daemon._retry_at[1] - after, daemon._retry_at[1] - before
            assert 1.0 - (after - before) <= low and high <= min(60.0, 2.0 ** tries)
            assert low - 0.1 <= left["retry_in_s"] <= high + 0.1, (left, low, high)
        assert daemon.sync.pending_count() == 1 and daemon.stats.dead == 0
    finally:
        daemon.stop(drain_s=0)


def test_a_change_refused_a_thousand_times_still_gets_a_retry_time(tmp_path: Path) -> None:
    """Regression: past ~1,000 refusals (a device disabled overnight, at the default
    0.5..60 s) 2^tries no longer fit a float; the reject's handling failed with
    OverflowError, so status stopped saying when the change goes again."""
    daemon = _daemon(tmp_path, 0.5, 60.0)
    try:
        daemon.agent.put("tasks", "t-1", {"route": S})
        daemon.stats.extra["try:1"] = 5000
        daemon._on_reject(_held(1))
        assert daemon.stats.extra["try:1"] == 5001
        assert 1 in daemon._retry_at
        left = daemon.agent.status().last_error
        assert left is not None and 0.0 <= left["retry_in_s"] <= 60.0
    finally:
        daemon.stop(drain_s=0)


_initial = st.floats(min_value=1e-3, max_value=1e4)
_draw = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)
_tries = st.integers(min_value=1, max_value=10**6)


@st.composite
def _settings(draw: st.DrawFn) -> tuple[float, float]:
    """(initial, maximum) as the config allows them: 0 < initial <= maximum."""
    initial = draw(_initial)
    return initial, initial * draw(st.floats(min_value=1.0, max_value=1e4))


@given(_tries, _settings(), _draw)
def test_the_delay_stays_between_the_floor_and_the_cap(
        tries: int, settings: tuple[float, float], u: float) -> None:
    initial, maximum = settings
    delay = retry_delay(tries, initial, maximum, u)
    assert initial <= delay <= maximum
    assert delay <= max(initial, initial * 2.0 ** min(tries, 1023))


@given(_tries, _settings(), _draw, _draw)
def test_more_tries_or_a_larger_draw_never_wait_less(
        tries: int, settings: tuple[float, float], u: float, v: float) -> None:
    initial, maximum = settings
    assert retry_delay(tries, initial, maximum, u) <= retry_delay(tries + 1, initial, maximum, u)
    lo, hi = sorted((u, v))
    assert retry_delay(tries, initial, maximum, lo) <= retry_delay(tries, initial, maximum, hi)
    assert retry_delay(tries, initial, maximum, 0.0) == initial


@given(st.integers(min_value=1, max_value=1000), _settings(), st.integers(0, 2**32))
def test_the_same_draws_as_the_daemon_made_before(
        tries: int, settings: tuple[float, float], seed: int) -> None:
    """Behaviour kept: what `AgentDaemon._backoff` returned, rng.uniform over the range
    (a seeded daemon waits the same times as before)."""
    initial, maximum = settings
    old = random.Random(seed).uniform(initial, max(min(maximum, initial * 2 ** tries), initial))
    assert retry_delay(tries, initial, maximum, random.Random(seed).random()) == old
