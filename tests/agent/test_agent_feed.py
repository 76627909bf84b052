"""The store's feed as apps see it: what each event says, connectivity, settling conflicts."""

from __future__ import annotations

import pytest

from agent.api import Agent
from agent.connectivity import classify
from agent.errors import NotFound, WriteRefused
from agent.link_feed import RETRY_EVENT_EVERY_S
from agent.models import FeedEvent
from schemas import wire
from tests.agent.agentkit import FakeClock, rec
from tests.agent.test_agent_sync import ack, page

S = "route-42"


def events(agent: Agent, since: int = 0) -> list[FeedEvent]:
    return list(agent.watch(since=since, timeout=0))


def test_local_write_event_names_its_change_id(agent: Agent) -> None:
    """A local write's feed event carries the change id the write returned."""
    result = agent.put("tasks", "t-1", {"route": S, "status": "out"})
    [event] = events(agent)
    assert (event.kind, event.collection, event.key) == ("local", "tasks", "t-1")
    assert event.data == {"change_ids": [result.change_id]}


def test_ack_event_says_synced_with_the_change_ids(agent: Agent) -> None:
    """An ack of own changes appears as one "synced" event per record with their ids."""
    agent.put("tasks", "t-1", {"route": S, "status": "out"})
    agent.put("tasks", "t-1", {"status": "in"})
    pos = agent.feed_position()
    agent.sync.apply_ack(ack((1, 1), (2, 2)))
    [event] = events(agent, pos)
    assert event.kind == "synced" and event.data == {"change_ids": ["van-1:1", "van-1:2"]}


def test_rejection_event_carries_reason_and_rolled_back_value(agent: Agent) -> None:
    """A permanent rejection's event names the change, the reason and the value after
    the roll-back (None when the rejected write had created the record)."""
    agent.sync.apply_page(page("c-1", 0, 3, [rec("t-1", 3, {"route": S, "status": "out"})]))
    agent.put("tasks", "t-1", {"status": "wrong"})
    agent.put("tasks", "t-2", {"route": S, "status": "new"})
    pos = agent.feed_position()
    agent.sync.apply_reject(wire.Reject(rj=[
        wire.Rejection(n=1, code="rule_rejected", reason="unknown status", perm=True),
        wire.Rejection(n=2, code="rule_rejected", reason="no", perm=True)]))
    first, second = events(agent, pos)
    assert first.kind == "rejected" and first.key == "t-1"
    assert first.data == {"change_ids": ["van-1:1"], "code": "rule_rejected",
                          "reason": "unknown status", "fields": {"route": S, "status": "out"}}
    assert second.data["fields"] is None


def test_conflict_opened_is_an_event(agent: Agent) -> None:
    """A delta that opens a manual conflict appends a "conflict" event naming the field."""
    cands = [{"v": "Dock 4", "by": "van-7", "h": "0190000000010000:van-7"}]
    agent.sync.apply_delta(wire.Delta(d=[rec("t-5", 1, {"route": S, "address": "Gate 1"},
                                             cf={"address": cands})]))
    kinds = [(e.kind, e.data.get("field")) for e in events(agent)]
    assert ("conflict", "address") in kinds
    assert kinds[-1] == ("remote", None)


def test_link_changes_are_recorded_once_per_state(agent: Agent, clock: FakeClock) -> None:
    """online/offline are recorded when they change; a retry is recorded when its code
    changes and otherwise at most every RETRY_EVENT_EVERY_S, while meta "link" (the
    status) follows every retry with its delay and the classified reason."""
    reason = "cannot connect to 127.0.0.1:1: [Errno 111] Connection refused"
    assert agent.sync.record_link("offline", reason)
    assert not agent.sync.record_link("offline", reason)
    assert agent.sync.record_link("retrying", reason, 2.04)
    clock.advance(2)
    assert not agent.sync.record_link("retrying", reason, 4.0)
    link = agent.link_state()
    assert link is not None and link["retry_in_s"] == 4.0 and link["t"] == clock.ms
    clock.advance(RETRY_EVENT_EVERY_S - 2)
    assert agent.sync.record_link("retrying", reason, 8.0)
    assert agent.sync.record_link("retrying", "broker refused the connection: Not authorized",
                                  16.0)
    assert agent.sync.record_link("online")
    got = [(e.kind, e.data.get("code"), e.data.get("retry_in_s")) for e in events(agent)]
    assert got == [("offline", "connection_refused", None),
                   ("retrying", "connection_refused", 2.0),
                   ("retrying", "connection_refused", 8.0),
                   ("retrying", "not_authorized", 16.0), ("online", "", None)]


@pytest.mark.parametrize(("text", "code"), [
    ("broker refused the connection: Bad user name or password", "login_refused"),
    ("broker refused the connection: Not authorized", "not_authorized"),
    ("cannot connect to h:1: [Errno 111] Connection refused", "connection_refused"),
    ("cannot connect to nowhere.invalid:1883: [Errno -2] Name or service not known", "dns"),
    ("cannot connect to h:8883: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed",
     "tls"),
    ("broker refused the connection: Server unavailable", "server_unavailable"),
    ("no CONNACK from h:1883 within 10.0 s", "timeout"),
    ("connection ended (The connection was lost.)", "network"),
    ("stopped", "stopped"),
])
def test_classify_link_reasons(text: str, code: str) -> None:
    """Each kind of link failure maps to its stable code."""
    assert classify(text) == code


def test_truncated_event_when_the_reader_fell_behind(agent: Agent) -> None:
    """A reader asking from a pruned position first gets a "truncated" event."""
    agent.put("tasks", "t-1", {"route": S})
    agent.put("tasks", "t-1", {"status": "a"})
    agent.store.write(lambda tx: tx.delete("feed", (1).to_bytes(8, "big")))
    agent.store.write(lambda tx: tx.delete("feed", (2).to_bytes(8, "big")))
    agent.put("tasks", "t-1", {"status": "b"})
    got = events(agent, 1)
    assert [e.kind for e in got] == ["truncated", "local"]
    assert got[0].data == {"after": 1}


# ------------------------------------------------------------ settling conflicts


def _open_conflict(agent: Agent) -> None:
    cands = [{"v": "Dock 4", "by": "van-7", "h": "0190000000010000:van-7"}]
    agent.sync.apply_page(page("c-1", 0, 4, [
        rec("t-5", 4, {"route": S, "address": "Gate 1"}, cf={"address": cands})]))


def test_resolve_conflict_writes_the_field_with_a_base_that_saw_it(agent: Agent) -> None:
    """Settling from the device is a put of the field whose b covers the conflict."""
    _open_conflict(agent)
    result = agent.resolve_conflict("tasks", "t-5", "address", "Dock 4")
    assert result.state == "pending"
    [entry] = agent.pending()
    assert entry["ch"]["f"] == {"address": "Dock 4"} and entry["ch"]["b"] >= 4


def test_resolve_conflict_refuses_without_an_open_conflict_or_manual_field(
        agent: Agent) -> None:
    """No open conflict -> NotFound; a non-manual field -> wrong_strategy."""
    agent.put("tasks", "t-1", {"route": S, "address": "x"})
    with pytest.raises(NotFound):
        agent.resolve_conflict("tasks", "t-1", "address", "y")
    with pytest.raises(WriteRefused) as err:
        agent.resolve_conflict("tasks", "t-1", "status", "y")
    assert err.value.code == "wrong_strategy"


def test_resolve_conflict_refuses_before_the_device_caught_up(agent: Agent) -> None:
    """A conflict known only from a delta beyond a gap cannot be settled yet."""
    cands = [{"v": "Dock 4", "by": "van-7", "h": "0190000000010000:van-7"}]
    agent.sync.apply_delta(wire.Delta(d=[rec("t-5", 9, {"route": S, "address": "Gate 1"},
                                             part=True, cf={"address": cands})]))
    with pytest.raises(WriteRefused) as err:
        agent.resolve_conflict("tasks", "t-5", "address", "Dock 4")
    assert err.value.code == "not_caught_up"


def test_discard_dead_letter(agent: Agent) -> None:
    """A discarded dead letter is gone; discarding an unknown one is NotFound."""
    agent.put("tasks", "t-1", {"route": S, "status": "x"})
    agent.sync.apply_reject(wire.Reject(rj=[wire.Rejection(n=1, code="invalid", reason="r",
                                                           perm=True)]))
    agent.discard_dead_letter(1)
    assert agent.dead_letters() == []
    with pytest.raises(NotFound):
        agent.discard_dead_letter(1)


def test_status_link_retry_in_s_is_rounded_to_the_ms(agent: Agent, clock: FakeClock) -> None:
    """GET /v1/status `link.retry_in_s` counts down from the recorded delay; it showed
    float noise (`2.2920000000000003`) to apps and operators."""
    reason = "cannot connect to 127.0.0.1:1: [Errno 111] Connection refused"
    agent.sync.record_link("retrying", reason, 2.3)
    for step_ms in (8, 1, 111, 7):
        clock.advance(step_ms / 1000)
        link = agent.status().link
        assert link is not None
        left = link["retry_in_s"]
        assert left == round(left, 3) and len(repr(left)) <= len("2.300"), left
    clock.advance(5.0)  # overdue: due now, never negative (nor -0.0)
    link = agent.status().link
    assert link is not None and repr(link["retry_in_s"]) == "0.0"
