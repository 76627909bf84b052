"""A merge server whose store refuses its writes says so in its liveness row, read by
`server status` (`broker.server.liveness`): since when, and the latest refusal; the
first batch the store takes again clears it. Over a real store of each backend, made to
fail on chosen calls (tests/server/faulty_store.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
from structlog.testing import capture_logs

from broker.errors import StoreError
from broker.server import liveness
from broker.server.engine import Engine
from broker.server.store.base import ServerRow, Store
from tests.server.conftest import StoreFactory
from tests.server.faulty_store import FaultyStore
from tests.server.helpers import FakeTime, by_device, changes, make_engine, oks, task

STALE_MS = liveness.STALE_AFTER_S * 1000
FULL = StoreError("could not extend file: No space left on device (free disk space on "
                  "the PostgreSQL server)")


@pytest.fixture
def env(tmp_path: Path, store_factory: StoreFactory
        ) -> Iterator[tuple[Engine, FaultyStore, FakeTime]]:
    faulty = FaultyStore(store_factory())
    engine, _, time = make_engine(tmp_path, {"van-1": ["r1"]}, store=cast(Store, faulty))
    yield engine, faulty, time


def _row(store: FaultyStore) -> ServerRow:
    with store.inner.read() as txn:
        (row,) = txn.servers()
    return row


def test_batches_refused_while_small_writes_pass(
        env: tuple[Engine, FaultyStore, FakeTime]) -> None:
    """The devices' batch is refused (a full disk that still takes a small row): the
    next tick's row says since when and why, `server status` says the server's writes
    are refused rather than plain "running"; the store taking a batch again clears it."""
    engine, store, time = env
    store.fail_transacts({1}, FULL)
    engine.handle_up("van-1", changes("van-1", [task(1, "a")]))
    failed_at = time.now
    time.now += 1_000
    engine.tick()
    row = _row(store)
    assert row.store_failing_ms == failed_at and "No space left" in row.store_error
    line = liveness.describe(row, time.now, STALE_MS)
    assert "running" in line and "ITS STORE REFUSES ITS WRITES since" in line, line
    assert "No space left on device" in line and "free disk space" in line, line
    doc = liveness.server_doc(row, time.now, STALE_MS)
    assert doc["store_failing_since"] is not None and "No space" in doc["store_error"]

    time.now += 1_000
    out = by_device(engine.handle_up("van-1", changes("van-1", [task(1, "a")])))  # resent
    assert [ok[0] for ok in oks(out["van-1"])] == [1]
    engine.tick()
    row = _row(store)
    assert (row.store_failing_ms, row.store_error) == (0, "")
    assert "REFUSES" not in liveness.describe(row, time.now, STALE_MS)
    assert liveness.server_doc(row, time.now, STALE_MS)["store_failing_since"] is None


def test_a_store_taking_no_write_at_all_leaves_the_server_gone_then_says_why(
        env: tuple[Engine, FaultyStore, FakeTime]) -> None:
    """Every write refused, the liveness row too: it goes stale (the server reads as
    gone, not running); once small writes pass again the row says the batches were
    refused since the first refusal, until a batch goes through."""
    engine, store, time = env
    seen = _row(store).seen_ms
    store.fail_transacts(None, FULL)
    # (captured: the console renderer of the tests' logs takes seconds per traceback)
    with capture_logs() as logs:
        engine.handle_up("van-1", changes("van-1", [task(1, "a")]))
        failed_at = time.now
        for _ in range(40):
            time.now += 1_000
            engine.tick()
    refusals = [e for e in logs if e["event"] == "store_failed"]
    assert refusals and all(e["log_level"] == "error" for e in refusals)
    # the liveness row alone, refused too: not logged again at every tick
    assert not [e for e in logs if e["event"] == "liveness_write_failed"
                and e["log_level"] != "debug"]
    assert _row(store).seen_ms == seen
    assert liveness.state(_row(store), time.now, STALE_MS) == "gone"
    store.heal()
    time.now += 1_000
    engine.tick()
    row = _row(store)
    assert row.seen_ms == time.now and row.store_failing_ms == failed_at
    engine.handle_up("van-1", changes("van-1", [task(1, "a")]))
    time.now += 1_000
    engine.tick()
    assert _row(store).store_failing_ms == 0
