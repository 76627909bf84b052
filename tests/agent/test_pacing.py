"""Adaptive batching (agent.pacing): a change on an idle link goes at once; changes
written while others are in flight gather until an answer or about one round trip, then
go as one batch — the rules alone (hypothesis), and a daemon against a scripted server."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

import agent.pacing as pacing
from agent.daemon import AgentDaemon
from agent.pacing import HOLD_MAX_S, HOLD_MIN_S, Pacer
from tests.agent import test_daemon_catchup as kit
from tests.agent.test_daemon_catchup import UP, _send, _wait_catchups
from tests.helpers import RecordingClient, wait_until

setup = kit.setup

times = st.floats(0, 1000, allow_nan=False)


@given(now=times, sent_at=times, srtt=st.floats(0, 100, allow_nan=False),
       inflight=st.integers(0, 10_000), at_send=st.integers(0, 10_000),
       waiting=st.integers(0, 2000), batch_max=st.integers(1, 1000))
def test_hold_rules(now: float, sent_at: float, srtt: float, inflight: int, at_send: int,
                    waiting: int, batch_max: int) -> None:
    pacer = Pacer(batch_max, srtt=srtt)
    pacer.sent(sent_at, at_send)
    held = pacer.hold(now, inflight, lambda: waiting)
    if held:
        assert inflight > 0, "an idle link never waits"
        assert waiting < batch_max, "a whole batch never waits"
        assert inflight >= at_send, "an answer ends the wait"
        assert now < sent_at + HOLD_MAX_S, "never longer than HOLD_MAX_S after a send"
        assert now < sent_at + max(HOLD_MIN_S, srtt)
    else:
        assert (inflight == 0 or waiting >= batch_max or inflight < at_send
                or now >= sent_at + min(HOLD_MAX_S, max(HOLD_MIN_S, srtt)))
    assert pacer.wake_at(now, 1e9) <= 1e9
    if held:
        assert pacer.wake_at(now, 1e9) <= sent_at + HOLD_MAX_S


@given(rtts=st.lists(st.floats(-1, 60, allow_nan=False), min_size=1, max_size=50))
def test_srtt_follows_the_round_trips_and_stays_bounded(rtts: list[float]) -> None:
    pacer = Pacer(500)
    for rtt in rtts:
        pacer.answered(rtt)
        assert 0 < pacer.srtt <= max(0.02, 10 * HOLD_MAX_S)
    pacer2 = Pacer(500)
    for _ in range(60):
        pacer2.answered(0.004)
    assert abs(pacer2.srtt - 0.004) < 0.001


# ------------------------------------------------------------- a daemon, a scripted server


def _changes(server: RecordingClient) -> list[dict[str, Any]]:
    msgs = [orjson.loads(m.payload) for m in server.received(UP)]
    return [m for m in msgs if m["type"] == "changes"]


def _ready(daemon: AgentDaemon, server: RecordingClient) -> None:
    [first] = _wait_catchups(server, 1)
    _send(server, {"type": "checkpoint", "req": first["req"],
                   "cp": {"route-42": 0, "depot-7": 0}})
    assert wait_until(lambda: daemon._catchup is None, 10)


def _put(daemon: AgentDaemon, key: str) -> int:
    n = daemon.agent.put("tasks", key, {"route": "route-42", "status": "out"}).n
    assert n is not None
    return n


def test_changes_written_while_one_is_in_flight_go_together_on_its_ack(
        setup: tuple[AgentDaemon, RecordingClient], monkeypatch: pytest.MonkeyPatch) -> None:
    daemon, server = setup
    monkeypatch.setattr(pacing, "HOLD_MAX_S", 30.0)
    daemon.pacer.srtt = 30.0  # a slow link: only the ack ends the wait here
    _ready(daemon, server)
    n1 = _put(daemon, "t-1")
    [first] = wait_until(lambda: _changes(server), 10, message="the lone change, at once")
    assert [c["n"] for c in first["ch"]] == [n1]
    later = [_put(daemon, f"t-{i}") for i in (2, 3, 4)]
    assert wait_until(lambda: daemon.stats.held > 0, 10)
    assert len(_changes(server)) == 1, "held while t-1 is unanswered"
    _send(server, {"type": "ack", "ok": [[n1, "route-42", 1]]})
    msgs = wait_until(lambda: (lambda m: m if len(m) >= 2 else None)(_changes(server)), 10)
    assert [c["n"] for c in msgs[1]["ch"]] == later, "one batch for the three"
    assert len(msgs) == 2


def test_held_changes_go_after_about_one_round_trip_without_an_answer(
        setup: tuple[AgentDaemon, RecordingClient], monkeypatch: pytest.MonkeyPatch) -> None:
    daemon, server = setup
    monkeypatch.setattr(pacing, "HOLD_MAX_S", 30.0)
    daemon.pacer.srtt = 0.5
    _ready(daemon, server)
    n1 = _put(daemon, "t-1")
    wait_until(lambda: _changes(server), 10)
    later = [_put(daemon, f"t-{i}") for i in (2, 3)]
    msgs = wait_until(lambda: (lambda m: m if len(m) >= 2 else None)(_changes(server)), 10,
                      message="the held changes, after the round-trip estimate")
    assert [c["n"] for c in msgs[0]["ch"]] == [n1]
    assert [c["n"] for c in msgs[1]["ch"]] == later
