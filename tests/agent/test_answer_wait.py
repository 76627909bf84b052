"""A device whose server answers nothing resends ever less often (`agent.answer_wait`):
the rule on a clock of the test's own, and a real agent over a real broker whose
scripted server reads the device's changes and never answers."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.answer_wait import MAX_FACTOR, AnswerWait
from agent.daemon import AgentDaemon
from schemas.collection import example_catalog_path, load_catalog
from tests.fixtures_brokers import PREFIX, SERVER_USER, USERS, BrokerProcess
from tests.helpers import RecordingClient, wait_until
from waystation.config import AgentConfig

CATALOG = load_catalog(example_catalog_path())
DEV = "van-12"
UP, DOWN = f"{PREFIX}/{DEV}/up", f"{PREFIX}/{DEV}/down"


def test_silence_doubles_the_wait_an_answer_restores_it() -> None:
    w = AnswerWait(10.0)
    for expected in (20.0, 40.0, 80.0, 160.0, 160.0):
        w.expired(sent_at=1.0)
        assert w.current == expected
    w.heard(5.0)
    assert w.current == 10.0
    w.expired(sent_at=4.0)  # sent before the server was last heard: lost, not ignored
    assert w.current == 10.0
    w.expired(sent_at=6.0)
    assert w.current == 20.0
    w.reset()  # a new connection, or the server group announced up
    assert w.current == 10.0


@given(st.lists(st.tuples(st.sampled_from(["heard", "expired", "reset"]),
                          st.floats(0, 1e6, allow_nan=False)), max_size=60),
       st.floats(0.01, 600))
def test_the_wait_stays_between_the_ack_timeout_and_its_bound(
        events: list[tuple[str, float]], base: float) -> None:
    w = AnswerWait(base)
    for kind, t in events:
        before = w.current
        if kind == "heard":
            w.heard(t)
        elif kind == "expired":
            w.expired(t)
        else:
            w.reset()
        assert base <= w.current <= base * MAX_FACTOR
        assert w.current in (base, before, min(base * MAX_FACTOR, before * 2))


@pytest.fixture
def server(broker: BrokerProcess) -> Iterator[RecordingClient]:
    """A scripted merge server that reads the device's up topic and answers nothing."""
    srv = RecordingClient(broker.port, "test-server", SERVER_USER, USERS[SERVER_USER])
    assert srv.connect() == "Success"
    assert srv.subscribe(UP) == 1
    yield srv
    srv.close()


def test_unanswered_changes_go_again_ever_less_often_then_at_once_when_answered(
        broker: BrokerProcess, server: RecordingClient, tmp_path: Path) -> None:
    """Nothing answers: the batch goes again after 0.5, 1, 2, 4 s (each gap at least the
    doubled wait: load can only lengthen them; before, every 0.5 s), and not a copy more.
    Then the server answers: the wait is the ack timeout again and the change is acked."""
    base = 0.5
    cfg = AgentConfig.model_validate({
        "device_id": DEV, "data_dir": str(tmp_path / "agent"), "scopes": ["route-42"],
        "mqtt": {"port": broker.port, "password": USERS[DEV]},
        "sync": {"backoff_initial_s": 0.05, "backoff_max_s": 0.5, "ack_timeout_s": base,
                 "deaf_after_s": 3600}})
    daemon = AgentDaemon(cfg, CATALOG, env={})
    daemon.start()
    sends: list[float] = []

    def changes() -> list[dict[str, object]]:
        msgs = [orjson.loads(m.payload) for m in server.received(UP)]
        return [m for m in msgs if m["type"] == "changes"]

    try:
        daemon.agent.put("tasks", "t-1", {"route": "route-42", "status": "out"})
        daemon.wake()

        def five_sends() -> bool:
            now = time.monotonic()
            while len(sends) < len(changes()):
                sends.append(now)
            return len(sends) >= 5

        wait_until(five_sends, 30, interval=0.01, message="five sends of the batch")
        gaps = [b - a for a, b in itertools.pairwise(sends)]
        for i, gap in enumerate(gaps[:4]):
            assert gap >= base * 2 ** i * 0.9, (i, gaps)
        assert daemon.answer_wait.current >= base * 8

        (msg, *_) = changes()
        n = msg["ch"][0]["n"]  # type: ignore[index]
        server.publish(DOWN, orjson.dumps({"v": 1, "type": "ack",
                                           "ok": [[n, "route-42", 1]]}))
        wait_until(lambda: daemon.sync.pending_count() == 0, 10, message="the ack applied")
        assert daemon.answer_wait.current == base
    finally:
        daemon.stop(drain_s=0.5)
