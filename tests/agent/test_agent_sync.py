"""The daemon-side storage operations: acks, rejects, deltas, pages, checkpoints, commands."""

from __future__ import annotations

from pathlib import Path

from agent.api import Agent
from schemas import wire
from schemas.collection import Catalog
from tests.agent.agentkit import FakeClock, assert_views_consistent, make_cfg, outbox_numbers, rec

S = "route-42"
LATER = "7fff00000000000a:van-7"
"""A stamp later than anything the test device writes."""


def ack(*ok: tuple[int, int], fx: list[wire.Rec] | None = None, rs: list[int] | None = None,
        scope: str = S) -> wire.Ack:
    return wire.Ack(ok=[(n, scope, q) for n, q in ok], fx=fx or [], rs=rs or [])


def page(req: str, frm: int, to: int, recs: list[wire.Rec], *, reset: bool = False,
         scope: str = S, more: bool = False) -> wire.Page:
    return wire.Page.model_validate({"req": req, "s": scope, "from": frm, "to": to,
                                     "reset": reset, "more": more, "recs": recs})


def fields(ag: Agent, key: str, c: str = "tasks") -> dict[str, object] | None:
    record = ag.get(c, key)
    return None if record is None else record.fields


# ------------------------------------------------------------------------ acks


def test_ack_applies_the_change_and_drops_it(agent: Agent, clock: FakeClock) -> None:
    """An ack moves the change into the base, empties the outbox, advances cp, marks sync."""
    agent.put("tasks", "t-1", {"route": S, "status": "out"})
    result = agent.sync.apply_ack(ack((1, 1)))
    assert result.applied == [1] and result.ignored == []
    record = agent.get("tasks", "t-1")
    assert record is not None and record.pending == 0 and record.version == 1
    assert record.sync == {"route": "synced", "status": "synced"}
    status = agent.status()
    assert status.pending == 0 and status.checkpoints[S] == 1 and status.last_sync_age_s == 0
    assert_views_consistent(agent)


def test_duplicate_ack_is_ignored(agent: Agent) -> None:
    """Applying the same ack twice has the effect of applying it once."""
    agent.put("tasks", "t-1", {"route": S, "status": "out"})
    agent.put("tasks", "t-1", {"status": "in"})
    message = ack((1, 1), (2, 2))
    agent.sync.apply_ack(message)
    before = agent.get("tasks", "t-1")
    again = agent.sync.apply_ack(message)
    assert again.applied == [] and again.ignored == [1, 2]
    assert agent.get("tasks", "t-1") == before
    assert_views_consistent(agent)


def test_worked_example_counter_and_set_come_from_fx(agent: Agent) -> None:
    """PROTOCOL §12: totals and tags come from fx; own lww values stand."""
    agent.sync.apply_page(page("c-1", 1188, 1190, [
        rec("t-1", 1190, {"route": S, "status": "failed", "notes": "gate locked"})]))
    agent.put("tasks", "t-1", {"status": "delivered"})
    agent.increment("tasks", "t-1", "attempts", 1)
    agent.add("tasks", "t-1", "labels", ["fragile"])
    assert agent.pending()[0]["ch"]["b"] == 1190
    agent.sync.apply_ack(ack((1, 1191), (2, 1192), (3, 1193), fx=[
        rec("t-1", 1192, {"attempts": 1}, part=True),
        rec("t-1", 1193, {"labels": ["fragile"]}, part=True,
            t={"labels": {"fragile": ["van-1:3"]}})]))
    assert fields(agent, "t-1") == {"route": S, "status": "delivered", "notes": "gate locked",
                                    "attempts": 1, "labels": ["fragile"]}
    assert agent.status().pending == 0
    assert agent.conflicts() == []
    assert_views_consistent(agent)


def test_lost_lww_write_is_recorded_as_a_conflict(agent: Agent) -> None:
    """When fx shows another stamp won a field the device wrote, the loss is kept."""
    agent.put("tasks", "t-1", {"route": S, "status": "delivered"})
    agent.sync.apply_ack(ack((1, 5), fx=[rec("t-1", 5, {"status": "failed"}, part=True,
                                             h={"status": LATER})]))
    assert fields(agent, "t-1") == {"route": S, "status": "failed"}
    [lost] = agent.conflicts()
    assert lost.kind == "lost" and lost.field == "status" and lost.value == "failed"
    assert lost.candidates[0]["v"] == "delivered" and lost.change_id == "van-1:1"
    assert agent.status().lost_writes == 1
    assert_views_consistent(agent)


def test_restamped_change_is_reported(agent: Agent) -> None:
    """A change the server re-stamped (rs) is applied and noted as a clock problem."""
    agent.put("tasks", "t-1", {"route": S, "status": "x"})
    agent.sync.apply_ack(ack((1, 1), rs=[1]))
    assert fields(agent, "t-1") == {"route": S, "status": "x"}
    error = agent.status().last_error
    assert error is not None and error["code"] == "clock_skew"


def test_acked_delete_leaves_a_deleted_base(agent: Agent) -> None:
    """put then delete, both acked: the record stays deleted and nothing is pending."""
    agent.put("tasks", "t-1", {"route": S, "status": "x"})
    agent.delete("tasks", "t-1")
    agent.sync.apply_ack(ack((1, 1), (2, 2)))
    assert agent.get("tasks", "t-1") is None
    deleted = agent.get("tasks", "t-1", include_deleted=True)
    assert deleted is not None and deleted.deleted and deleted.pending == 0
    assert_views_consistent(agent)


# --------------------------------------------------------------------- rejects


def test_permanent_reject_rolls_back_and_dead_letters(agent: Agent) -> None:
    """perm: out of the outbox into the dead letters, the view rolls back, others stay."""
    agent.sync.apply_page(page("c-1", 0, 3, [rec("t-1", 3, {"route": S, "status": "out"})]))
    agent.put("tasks", "t-1", {"status": "wrong"})
    agent.put("tasks", "t-1", {"notes": "kept"})
    assert fields(agent, "t-1") == {"route": S, "status": "wrong", "notes": "kept"}
    result = agent.sync.apply_reject(wire.Reject(rj=[wire.Rejection(
        n=1, code="rule_rejected", reason="status must be a known state", perm=True,
        rec=rec("t-1", 3, {"route": S, "status": "out"}))]))
    assert result.dead == [1]
    assert fields(agent, "t-1") == {"route": S, "status": "out", "notes": "kept"}
    [dead] = agent.dead_letters()
    assert (dead.n, dead.change_id, dead.code) == (1, "van-1:1", "rule_rejected")
    assert dead.reason == "status must be a known state"
    assert dead.change["f"] == {"status": "wrong"}
    assert outbox_numbers(agent) == [2]
    assert agent.status().dead_letters == 1
    assert_views_consistent(agent)


def test_dead_letter_does_not_block_later_changes(agent: Agent) -> None:
    """After a permanent reject the following changes drain and ack as usual."""
    for i in range(3):
        agent.put("tasks", f"t-{i}", {"route": S})
    agent.sync.apply_reject(wire.Reject(rj=[wire.Rejection(n=2, code="invalid", reason="x",
                                                           perm=True)]))
    assert agent.sync.next_batch().numbers == [1, 3]
    agent.sync.apply_ack(ack((1, 1), (3, 2)))
    assert agent.status().pending == 0 and agent.status().dead_letters == 1
    assert fields(agent, "t-1") is None, "the rejected create is rolled back"


def test_transient_reject_keeps_the_change(agent: Agent, clock: FakeClock) -> None:
    """perm false: the change stays, with its attempt count and last error."""
    agent.put("tasks", "t-1", {"route": S})
    message = wire.Reject(rj=[wire.Rejection(n=1, code="schema_version", reason="retry",
                                             perm=False)])
    assert agent.sync.apply_reject(message).transient == [1]
    agent.sync.apply_reject(message)
    [entry] = agent.pending()
    assert entry["at"] == 2 and entry["err"] == "schema_version: retry"
    assert agent.sync.next_batch().numbers == [1]
    assert fields(agent, "t-1") == {"route": S}


def test_message_level_error_is_kept_for_status(agent: Agent) -> None:
    """A reject's message-level err is remembered for status."""
    result = agent.sync.apply_reject(wire.Reject(err=wire.ErrorInfo(code="too_large",
                                                                    reason="split")))
    assert result.error == {"code": "too_large", "reason": "split"}
    error = agent.status().last_error
    assert error is not None and error["code"] == "too_large"


def test_reject_for_unknown_n_is_ignored(agent: Agent) -> None:
    """A rejection of a change no longer in the outbox changes nothing."""
    result = agent.sync.apply_reject(wire.Reject(rj=[wire.Rejection(n=9, code="invalid",
                                                                    reason="x", perm=True)]))
    assert result.ignored == [9] and agent.dead_letters() == []


# ---------------------------------------------------------------- sending order


def test_next_batch_drains_high_priority_first_then_by_n(agent: Agent) -> None:
    """Higher priority first, then n; in-flight changes excluded; max_changes honoured."""
    for i, prio in enumerate([0, 5, 0, 5, -1], start=1):
        agent.put("tasks", f"t-{i}", {"route": S}, priority=prio)
    assert agent.sync.next_batch().numbers == [2, 4, 1, 3, 5]
    assert agent.sync.next_batch(exclude_n={2, 1}).numbers == [4, 3, 5]
    assert agent.sync.next_batch(max_changes=2).numbers == [2, 4]


def test_next_batch_respects_max_bytes_but_sends_at_least_one(agent: Agent) -> None:
    """A batch stays within max_bytes; a single big change still goes alone."""
    for i in range(5):
        agent.put("tasks", f"t-{i}", {"route": S, "notes": "n" * 400})
    assert len(agent.sync.next_batch(max_bytes=1200)) == 2
    assert len(agent.sync.next_batch(max_bytes=10)) == 1


def test_batch_builds_a_valid_changes_message(agent: Agent) -> None:
    """The batch's message validates as a `changes` message of this device."""
    agent.put("tasks", "t-1", {"route": S, "status": "out"})
    agent.add("tasks", "t-1", "labels", ["a"])
    message = agent.sync.next_batch().message("van-1")
    assert message.dev == "van-1" and message.sv == 1 and [c.n for c in message.ch] == [1, 2]


def test_batch_holds_one_schema_version(tmp_path: Path, catalog: Catalog) -> None:
    """Changes written under another schema version go in a later batch."""
    cfg = make_cfg(tmp_path)
    with Agent.open(cfg, catalog) as ag:
        ag.put("tasks", "t-1", {"route": S})
    newer = catalog.model_copy(update={"version": 2})
    with Agent.open(cfg, newer) as ag:
        ag.put("tasks", "t-2", {"route": S})
        ag.put("tasks", "t-3", {"route": S})
        first = ag.sync.next_batch()
        assert first.sv == 1 and first.numbers == [1]
        second = ag.sync.next_batch(exclude_n={1})
        assert second.sv == 2 and second.numbers == [2, 3]


# -------------------------------------------------------------- deltas, pages


def test_deltas_in_any_order_and_twice_give_the_same_record(agent: Agent) -> None:
    """Deltas applied reordered and duplicated end in the same record and checkpoint."""
    deltas = [
        wire.Delta(d=[rec("t-1", 1, {"route": S, "status": "a"})]),
        wire.Delta(d=[rec("t-1", 2, {"status": "b"}, part=True)]),
        wire.Delta(d=[rec("t-1", 3, {"notes": "n"}, part=True)]),
    ]
    for d in (deltas[2], deltas[0], deltas[2], deltas[1], deltas[0]):
        agent.sync.apply_delta(d)
    assert fields(agent, "t-1") == {"route": S, "status": "b", "notes": "n"}
    assert agent.status().checkpoints[S] == 3 and agent.status().gaps == []
    assert_views_consistent(agent)


def test_delta_leaves_pending_writes_on_top(agent: Agent) -> None:
    """A delta replaces the base; the device's pending write still shows on top."""
    agent.put("tasks", "t-1", {"route": S, "status": "mine"})
    agent.sync.apply_delta(wire.Delta(d=[rec("t-1", 1, {"route": S, "status": "theirs",
                                                        "notes": "n"})]))
    record = agent.get("tasks", "t-1")
    assert record is not None
    assert record.fields == {"route": S, "status": "mine", "notes": "n"}
    assert record.sync["status"] == "pending" and record.sync["notes"] == "synced"
    agent.sync.apply_delta(wire.Delta(d=[rec("t-1", 2, {"status": "newest"}, part=True,
                                             h={"status": LATER})]))
    assert fields(agent, "t-1") == {"route": S, "status": "newest", "notes": "n"}


def test_received_stamp_moves_the_clock_forward(agent: Agent) -> None:
    """A later stamp received in a delta makes the next local write later still (§4)."""
    agent.sync.apply_delta(wire.Delta(d=[rec("t-1", 1, {"route": S, "status": "x"},
                                             h={"status": LATER})]))
    result = agent.put("tasks", "t-1", {"status": "edit"})
    assert (result.stamp or "") > LATER
    assert fields(agent, "t-1") == {"route": S, "status": "edit"}


def test_gap_is_reported_and_filled(agent: Agent, clock: FakeClock) -> None:
    """A delta beyond cp + 1 opens a gap; it ages; the missing sequence closes it."""
    agent.sync.apply_delta(wire.Delta(d=[rec("t-2", 2, {"route": S})]))
    assert agent.status().checkpoints[S] == 0 and agent.status().gaps == [S]
    assert not agent.sync.gaps_older_than(5)
    clock.advance(6)
    assert agent.sync.gaps_older_than(5)
    agent.sync.apply_delta(wire.Delta(d=[rec("t-1", 1, {"route": S})]))
    assert agent.status().checkpoints[S] == 2 and not agent.sync.gaps_older_than(0)


def test_page_moves_cp_only_when_it_continues(agent: Agent) -> None:
    """A page from cp moves cp to `to`; one from beyond cp (a lost page) does not."""
    agent.sync.apply_page(page("c-1", 0, 5, [rec("t-1", 5, {"route": S})], more=True))
    assert agent.status().checkpoints[S] == 5
    agent.sync.apply_page(page("c-1", 8, 9, [rec("t-3", 9, {"route": S})]))
    assert agent.status().checkpoints[S] == 5, "pages 5 -> 8 were lost"
    assert fields(agent, "t-3") == {"route": S}, "the records still apply"
    agent.sync.apply_page(page("c-1", 0, 5, [rec("t-1", 5, {"route": S})], more=True))
    assert agent.status().checkpoints[S] == 5
    request = agent.sync.catchup_request("c-2")
    assert request.cp[S] == 5 and request.req == "c-2" and request.snap == []


def test_checkpoint_ahead_of_the_pages_asks_for_more(agent: Agent) -> None:
    """A checkpoint beyond what the pages delivered is reported behind, not trusted."""
    agent.sync.apply_page(page("c-1", 0, 5, []))
    result = agent.sync.apply_checkpoint(wire.Checkpoint(req="c-1", cp={S: 8}))
    assert result.behind == [S]
    assert agent.status().checkpoints[S] == 5 and agent.status().gaps == [S]
    complete = agent.sync.apply_checkpoint(wire.Checkpoint(req="c-1", cp={S: 5}))
    assert S in complete.complete


def test_snapshot_drops_untouched_records_and_keeps_pending_writes(agent: Agent) -> None:
    """§9.5: after a reset, records no page/delta/ack touched are dropped from the base at
    the checkpoint; pending writes stay on top; other scopes are not touched."""
    agent.sync.apply_page(page("c-1", 0, 10, [
        rec("a", 4, {"route": S, "status": "a"}), rec("b", 8, {"route": S, "status": "b"}),
        rec("gone", 9, {"route": S})]))
    agent.sync.apply_page(page("c-1", 0, 3, [rec("x", 3, {"depot": "depot-7"}, c="inventory",
                                                  s="depot-7")], scope="depot-7"))
    agent.put("tasks", "b", {"notes": "pending on b"})
    agent.put("tasks", "c", {"route": S, "status": "new"})
    request = agent.sync.catchup_request("c-2")
    agent.sync.apply_page(page("c-2", 0, 20, [rec("a", 20, {"route": S, "status": "a2"})],
                               reset=True, more=True))
    assert agent.sync.catchup_request("c-2").snap == [S]
    agent.sync.apply_page(page("c-2", 0, 20, [rec("a", 20, {"route": S, "status": "a2"})],
                               reset=True, more=True))  # a duplicate of the reset page
    agent.sync.apply_delta(wire.Delta(d=[rec("d", 21, {"route": S, "status": "live"})]))
    agent.sync.apply_page(page("c-2", 20, 21, []))
    assert fields(agent, "gone") == {"route": S}, "nothing dropped before the checkpoint"
    result = agent.sync.apply_checkpoint(wire.Checkpoint(req="c-2", cp={S: 21, "depot-7": 3}))
    assert result.dropped == 2 and result.complete == [S, "depot-7"]
    assert fields(agent, "a") == {"route": S, "status": "a2"}
    assert fields(agent, "d") == {"route": S, "status": "live"}
    assert fields(agent, "gone") is None
    assert fields(agent, "b") == {"notes": "pending on b"}, "pending write stays on top"
    assert fields(agent, "c") == {"route": S, "status": "new"}
    assert fields(agent, "x", "inventory") == {"depot": "depot-7"}
    assert outbox_numbers(agent) == [1, 2]
    assert agent.status().checkpoints[S] == 21 and agent.status().snapshots == []
    assert request.cp == {S: 10, "depot-7": 3, "fleet": 0}
    assert_views_consistent(agent)


def test_stale_checkpoint_does_not_end_a_snapshot(agent: Agent) -> None:
    """A checkpoint of an older request arriving mid-snapshot drops nothing."""
    agent.sync.apply_page(page("c-1", 0, 2, [rec("old", 2, {"route": S})]))
    agent.sync.catchup_request("c-2")
    agent.sync.apply_page(page("c-2", 0, 1, [], reset=True, more=True))
    result = agent.sync.apply_checkpoint(wire.Checkpoint(req="c-1", cp={S: 1}))
    assert result.dropped == 0 and fields(agent, "old") == {"route": S}
    assert agent.status().snapshots == [S]


# -------------------------------------------------------------------- commands


def test_wipe_erases_data_and_starts_a_new_incarnation(agent: Agent) -> None:
    """wipe: records, outbox, dead letters, checkpoints, conflicts gone; a new store (new
    incarnation, n from 1); the wipe is reported done and never runs twice."""
    agent.sync.apply_page(page("c-1", 0, 4, [rec("t-1", 4, {"route": S})]))
    agent.put("tasks", "t-2", {"route": S})
    agent.put("tasks", "t-3", {"route": S})
    agent.sync.apply_reject(wire.Reject(rj=[wire.Rejection(n=2, code="x", reason="y",
                                                           perm=True)]))
    before = agent.sync.hello("waystation/0.1.0").inc
    agent.wipe("cmd-1")
    assert agent.list("tasks") == [] and agent.dead_letters() == []
    status = agent.status()
    assert status.pending == 0 and status.checkpoints[S] == 0 and status.last_sync_ms is None
    hello = agent.sync.hello("waystation/0.1.0")
    assert hello.done == ["cmd-1"] and hello.inc != before
    assert agent.sync.command_done("cmd-1")
    assert agent.put("tasks", "t-9", {"route": S}).n == 1, "a new store numbers from 1"
    assert agent.status().pending == 1
    assert_views_consistent(agent)


def test_resync_drops_the_base_and_keeps_the_outbox(agent: Agent) -> None:
    """resync: base and checkpoints gone, pending changes kept and still shown."""
    agent.sync.apply_page(page("c-1", 0, 4, [rec("t-1", 4, {"route": S, "status": "base"}),
                                              rec("t-2", 3, {"route": S})]))
    agent.put("tasks", "t-1", {"notes": "mine"})
    assert agent.sync.execute_command(wire.Command(id="r-1", cmd="resync"))
    assert fields(agent, "t-1") == {"notes": "mine"}
    assert fields(agent, "t-2") is None
    assert agent.status().checkpoints[S] == 0 and outbox_numbers(agent) == [1]
    assert agent.sync.catchup_request("c-9").cp[S] == 0
    assert_views_consistent(agent)


def test_ping_is_reported_done_once(agent: Agent) -> None:
    """ping changes nothing and is executed at most once."""
    agent.put("tasks", "t-1", {"route": S})
    assert agent.sync.execute_command(wire.Command(id="p-1", cmd="ping"))
    assert not agent.sync.execute_command(wire.Command(id="p-1", cmd="ping"))
    assert agent.status().pending == 1
    hello = agent.sync.hello("waystation/0.1.0", z=False)
    assert hello.done == ["p-1"] and hello.dev == "van-1" and hello.sv == 1 and not hello.z


def test_status_message_carries_counts_only(agent: Agent, clock: FakeClock) -> None:
    """The retained status message has presence and counts, nothing private."""
    agent.put("tasks", "t-1", {"route": S, "customer": "private"})
    clock.advance(2)
    message = agent.sync.status_message(True, "waystation/0.1.0")
    assert (message.on, message.pend, message.old, message.dl) == (True, 1, 2000, 0)
    assert "private" not in message.model_dump_json()


def test_acks_out_of_order_advance_the_checkpoint(agent: Agent) -> None:
    """Acks arriving in reverse order still end with every change applied and cp at 2."""
    agent.put("tasks", "t-1", {"route": S, "status": "a"})
    agent.put("tasks", "t-1", {"status": "b"})
    agent.sync.apply_ack(ack((2, 2)))
    assert agent.status().checkpoints[S] == 0 and agent.status().gaps == [S]
    assert fields(agent, "t-1") == {"route": S, "status": "b"}
    agent.sync.apply_ack(ack((1, 1)))
    assert agent.status().checkpoints[S] == 2 and agent.status().gaps == []
    assert fields(agent, "t-1") == {"route": S, "status": "b"}
    assert_views_consistent(agent)
