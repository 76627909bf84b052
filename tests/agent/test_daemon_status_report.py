"""The retained `status` tells the server what the outbox holds soon after that changed
in a way an operator acts on (agent.status_report): drained, or changes that keep
waiting; never more than one report a second. The daemon part runs over a real broker
with the scripted server of tests/agent/test_daemon_catchup.py."""

from __future__ import annotations

from typing import Any

import orjson

from agent.daemon import AgentDaemon
from agent.status_report import StatusReports
from tests.agent import test_daemon_catchup as kit
from tests.agent.test_daemon_catchup import DEV, _send
from tests.agent.test_daemon_commands import _finish_first_catchup, _wait_up
from tests.fixtures_brokers import PREFIX
from tests.helpers import RecordingClient, wait_until

setup = kit.setup
STATUS = f"{PREFIX}/{DEV}/status"


def test_a_drained_outbox_is_reported_within_the_gap() -> None:
    r = StatusReports(interval_s=30)
    assert r.periodic_due(100.0)
    r.sent(100.0, 5)
    assert not r.periodic_due(129.9) and r.periodic_due(130.0)
    assert not r.prompt_due(100.5, 5)   # still true
    assert not r.prompt_due(100.5, 3)   # fewer, still some: the periodic report says it
    assert not r.prompt_due(100.9, 0)   # drained, but a report went less than 1 s ago
    assert r.prompt_due(101.0, 0)
    r.sent(101.0, 0)
    assert not r.prompt_due(105.0, 0)


def test_changes_that_keep_waiting_are_reported_but_not_a_quick_ack() -> None:
    r = StatusReports(interval_s=30)
    r.sent(0.0, 0)
    # A busy device: each write acked within the second, never reported one by one.
    for t in range(1, 20):
        assert not r.prompt_due(t + 0.25, 2)
        assert not r.prompt_due(t + 0.5, 0)
    assert not r.prompt_due(20.0, 3)    # waiting since 20.0 ...
    assert not r.prompt_due(20.75, 3)
    assert r.prompt_due(21.0, 4)        # ... for a second: worth saying
    r.sent(21.0, 4)
    assert not r.prompt_due(21.5, 0)    # drained at once: at most one report a second
    assert r.prompt_due(22.0, 0)


def test_nothing_prompt_before_a_count_was_reported() -> None:
    r = StatusReports(interval_s=30)
    assert not r.prompt_due(5.0, 3)
    r.sent(5.0, None)                   # the offline status carries no count
    assert not r.prompt_due(50.0, 0) and not r.prompt_due(60.0, 3)


def _statuses(server: RecordingClient) -> list[dict[str, Any]]:
    return [orjson.loads(m.payload) for m in server.received(STATUS)]


def _wait_status(server: RecordingClient, pend: int, after: int) -> dict[str, Any]:
    """The first status after the first `after` ones that says `pend`."""
    found: dict[str, Any] = wait_until(
        lambda: next((s for s in _statuses(server)[after:] if s.get("pend") == pend), None),
        10, message=f"a status with pend {pend}")
    return found


def test_the_daemon_reports_waiting_and_drained_without_the_periodic_status(
        setup: tuple[AgentDaemon, RecordingClient]) -> None:
    """`sync.status_interval_s` is 30 s here: each report below comes well before it."""
    daemon, server = setup
    assert daemon.cfg.sync.status_interval_s == 30
    assert server.subscribe(STATUS) == 1
    _wait_status(server, 0, 0)          # the retained one from the connect
    _finish_first_catchup(daemon, server)
    seen = len(_statuses(server))
    daemon.agent.put("tasks", "t-1", {"route": "route-42", "status": "new"})
    [sent] = _wait_up(server, "changes", 1)
    waiting = _wait_status(server, 1, seen)  # no ack comes: it keeps waiting
    seen = _statuses(server).index(waiting) + 1
    _send(server, {"type": "ack", "ok": [[sent["ch"][0]["n"], "route-42", 1]]})
    drained = _wait_status(server, 0, seen)
    assert drained["on"] is True and drained["t"] - waiting["t"] >= 900  # ~1 s apart
    assert len(_statuses(server)) == seen + 1  # one report each, no flood
