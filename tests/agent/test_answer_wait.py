"""A device whose server answers nothing, or is behind, resends ever less often
(`agent.answer_wait`): the rule on a clock of the test's own, a real agent over a real
broker whose scripted server reads the device's changes and never answers, and one whose
scripted server answers each batch late."""

from __future__ import annotations

import itertools
import threading
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
    for i, expected in enumerate((20.0, 40.0, 80.0, 160.0, 160.0)):
        w.expired(sent_at=1.0 + i)
        assert w.current == expected
    w.answered(sent_at=15.0, now=16.0)  # a prompt answer: the server keeps up again
    assert w.current == 10.0
    w.expired(sent_at=4.0)  # sent before a change that was answered: lost, not ignored
    assert w.current == 10.0
    w.answered(sent_at=31.0, now=32.0)
    w.expired(sent_at=31.0)  # sent with the one answered: no telling
    assert w.current == 20.0
    w.expired(sent_at=50.0)
    assert w.current == 40.0
    w.reset()  # a new connection, or the server group announced up
    assert w.current == 10.0


def test_a_server_behind_is_given_the_time_it_takes() -> None:
    """Answers keep coming, but late, and only to changes sent before the round that
    expired (the server works through a queue): the wait grows as under silence and
    then follows the time the answers take; prompt answers bring back the ack timeout."""
    w = AnswerWait(2.0)
    w.answered(sent_at=0.0, now=1.5)
    assert w.current == 3.0  # twice what that answer took
    w.expired(sent_at=0.5)
    assert w.current == 6.0
    w.answered(sent_at=0.4, now=7.4)  # an old one, 7 s late
    assert w.current == 14.0
    w.answered(sent_at=20.0, now=20.3)
    assert w.current == 2.0
    w.answered(sent_at=21.0, now=200.0)
    assert w.current == 32.0  # at most MAX_FACTOR ack timeouts


@given(st.lists(st.tuples(st.sampled_from(["answered", "expired", "reset"]),
                          st.floats(0, 1e6, allow_nan=False),
                          st.floats(0, 1e3, allow_nan=False)), max_size=60),
       st.floats(0.01, 600))
def test_the_wait_stays_between_the_ack_timeout_and_its_bound(
        events: list[tuple[str, float, float]], base: float) -> None:
    w = AnswerWait(base)
    newest = float("-inf")
    for kind, t, took in events:
        before = w.current
        if kind == "answered":
            w.answered(t, t + took)
            newest = max(newest, t)
            took = (t + took) - t  # as the clock reads it
            assert w.current == min(base * MAX_FACTOR, max(base, 2 * took))
        elif kind == "expired":
            w.expired(t)
            # Lost, not ignored, when something sent after it was answered.
            assert w.current == (before if newest > t else min(base * MAX_FACTOR, before * 2))
        else:
            w.reset()
            assert w.current == base
        assert base <= w.current <= base * MAX_FACTOR


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
    Then the server answers: the change is acked, and once an answer comes promptly the
    wait is the ack timeout again."""
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
        # That answer took the whole silence (counted from the change's first sending).
        assert daemon.answer_wait.current >= base * 8

        daemon.agent.put("tasks", "t-2", {"route": "route-42", "status": "out"})
        daemon.wake()
        wait_until(lambda: len(changes()) > len(sends), 10, message="t-2 sent")
        n = changes()[-1]["ch"][0]["n"]  # type: ignore[index]
        server.publish(DOWN, orjson.dumps({"v": 1, "type": "ack",
                                           "ok": [[n, "route-42", 2]]}))
        wait_until(lambda: daemon.sync.pending_count() == 0, 10, message="t-2 acked")
        # Answered within the ack timeout: the wait follows (at least the ack timeout).
        assert daemon.answer_wait.current < base * 8
    finally:
        daemon.stop(drain_s=0.5)


def test_a_server_behind_is_sent_few_copies(
        broker: BrokerProcess, server: RecordingClient, tmp_path: Path) -> None:
    """The scripted server answers every message, in order, but takes 0.35 s over each
    (copies too): behind by more than the ack timeout within a second of writes.
    Resending every round at the ack timeout filled its queue with copies that delayed
    the rest (each answer brought the wait back); now the wait follows the time its
    answers take, and every change is acked all the same."""
    base, per_message, writes = 0.5, 0.35, 20
    cfg = AgentConfig.model_validate({
        "device_id": DEV, "data_dir": str(tmp_path / "agent"), "scopes": ["route-42"],
        "mqtt": {"port": broker.port, "password": USERS[DEV]},
        "sync": {"backoff_initial_s": 0.05, "backoff_max_s": 0.5, "ack_timeout_s": base,
                 "batch_max_changes": 1, "max_inflight_changes": writes,
                 "deaf_after_s": 3600}})
    daemon = AgentDaemon(cfg, CATALOG, env={})
    stop = threading.Event()
    seqs: dict[int, int] = {}
    copies: list[int] = []

    def answer() -> None:  # the slow server: one message at a time, in order
        done = 0
        while not stop.is_set():
            msgs = server.received(UP)
            if done == len(msgs):
                time.sleep(0.01)
                continue
            msg = orjson.loads(msgs[done].payload)
            done += 1
            if msg["type"] != "changes":
                continue
            copies.append(len(msg["ch"]))
            time.sleep(per_message)
            ok = [[ch["n"], ch["s"], seqs.setdefault(ch["n"], len(seqs) + 1)]
                  for ch in msg["ch"]]
            server.publish(DOWN, orjson.dumps({"v": 1, "type": "ack", "ok": ok}))

    worker = threading.Thread(target=answer, daemon=True)
    worker.start()
    daemon.start()
    try:
        for i in range(writes):
            daemon.agent.put("tasks", f"t-{i}", {"route": "route-42", "status": "out"})
            daemon.wake()
            time.sleep(0.1)
        wait_until(lambda: daemon.sync.pending_count() == 0, 120, message="every change acked")
        assert len(seqs) == writes
        sent = sum(copies)
        # Measured here: 41-42 changes sent for these 20 before (a round again at every
        # ack timeout), 20 now (the wait follows the answers' time).
        assert sent <= 1.5 * writes, sent
    finally:
        stop.set()
        worker.join(10)
        daemon.stop(drain_s=0.5)
