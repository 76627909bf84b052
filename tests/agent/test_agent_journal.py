"""The journal of acked changes (agent.journal, PROTOCOL.md §9.7): the ack moves a change
into it, prune keeps it within its window and byte cap, and a resync ordered by a
restore moves back into the outbox exactly the changes the restored store lacks."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jsonschema
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import schemas
from agent import journal
from agent.api import Agent
from agent.core import Work
from agent.daemon_retention import RetentionHooks
from agent.journal import Journaled, Limits, select
from schemas import codec, wire
from schemas.collection import Catalog
from tests.agent.agentkit import FakeClock, assert_views_consistent, outbox_numbers
from waystation.config import AgentConfig

S = "route-42"
D = "depot-7"
DAY_S = 86_400


def _cfg(data_dir: Path, **sync: Any) -> AgentConfig:
    return AgentConfig.model_validate({"device_id": "van-1", "data_dir": data_dir,
                                       "scopes": [S, D, "fleet"], "sync": sync})


@pytest.fixture
def small(tmp_path: Path, catalog: Catalog, clock: FakeClock) -> Iterator[Agent]:
    """An agent whose journal keeps 1 day and at most 1 MiB."""
    ag = Agent.open(_cfg(tmp_path / "small", acked_journal_days=1, acked_journal_max_mb=1),
                    catalog, now_ms=clock)
    yield ag
    ag.close()


def ack(*ok: tuple[int, str, int]) -> wire.Ack:
    return wire.Ack(ok=list(ok))


def restore(cmd_id: str, seqs: Any) -> wire.Command:
    return wire.Command(id=cmd_id, cmd="resync", args={"why": "restore", "seqs": seqs})


def journaled(ag: Agent) -> dict[int, dict[str, Any]]:
    def run(work: Work) -> dict[int, dict[str, Any]]:
        return {int.from_bytes(k, "big"): v for k, v in work.tx.items(journal.DB)}
    return ag._core.read(run)


def entries(ag: Agent) -> dict[int, dict[str, Any]]:
    return {e["ch"]["n"]: e for e in ag.pending()}


def test_ack_moves_the_change_into_the_journal(agent: Agent, clock: FakeClock) -> None:
    agent.put("tasks", "t-1", {"route": S, "status": "out"})
    sent = entries(agent)[1]
    agent.sync.apply_ack(ack((1, S, 41)))
    assert agent.pending() == []
    doc = journaled(agent)[1]
    assert (doc["s"], doc["q"], doc["a"]) == (S, 41, clock.ms)
    assert doc["e"]["ch"] == sent["ch"] and doc["e"]["i"] == sent["i"]
    assert doc["e"]["t"] == sent["t"] and doc["e"]["p"] == sent["p"]
    status = agent.status()
    assert status.journal["changes"] == 1 and status.journal["bytes"] > 0
    assert status.replayed is None
    # A duplicate ack journals nothing more; an ack with q 0 (the server forgot when
    # it applied the change) is not journaled: nobody could tell whether a backup has it.
    agent.sync.apply_ack(ack((1, S, 41)))
    agent.put("tasks", "t-2", {"route": S})
    agent.sync.apply_ack(ack((2, S, 0)))
    assert sorted(journaled(agent)) == [1]


def test_restore_resync_gives_back_what_the_restored_store_lacks(agent: Agent) -> None:
    agent.put("tasks", "t-1", {"route": S, "status": "a"})        # n 1: in the backup
    agent.put("tasks", "t-2", {"route": S, "status": "b"})        # n 2: after it
    agent.increment("tasks", "t-1", "attempts", 1)                # n 3: after it
    agent.put("inventory", "sku-1", {"depot": D, "sku": "sku-1"})  # n 4: scope unknown
    agent.put("tasks", "t-3", {"route": S, "status": "pending"})  # n 5: never acked
    sent = entries(agent)
    agent.sync.apply_ack(ack((1, S, 10), (2, S, 11), (3, S, 12), (4, D, 3)))
    assert outbox_numbers(agent) == [5]

    assert agent.sync.execute_command(restore("r-1", {S: 10}))
    # Same change ids, stamps, creation times and incarnation; original order.
    assert outbox_numbers(agent) == [2, 3, 4, 5]
    back = entries(agent)
    for n in (2, 3, 4):
        assert back[n]["ch"] == sent[n]["ch"] and back[n]["t"] == sent[n]["t"]
        assert back[n]["i"] == sent[n]["i"] and back[n]["at"] == 0
    assert sorted(journaled(agent)) == [1]
    # The views show them on top of the (dropped) base: the resync keeps the outbox.
    t2 = agent.get("tasks", "t-2")
    assert t2 is not None and t2.fields["status"] == "b" and t2.pending == 1
    assert agent.get("tasks", "t-1") is not None  # the increment is pending on it
    assert agent.get("inventory", "sku-1") is not None
    status = agent.status()
    assert status.replayed is not None
    assert (status.replayed["id"], status.replayed["changes"]) == ("r-1", 3)
    assert status.replayed["scopes"] == {S: 2, D: 1}
    assert "sending 3 acked changes again, not all acked yet" in status.summary()
    assert status.checkpoints[S] == 0
    assert_views_consistent(agent)

    # At most once per command id; acked again, they go back into the journal.
    assert not agent.sync.execute_command(restore("r-1", {S: 0}))
    assert outbox_numbers(agent) == [2, 3, 4, 5]
    agent.sync.apply_ack(ack((2, S, 10**12 + 11), (3, S, 10**12 + 12), (4, D, 10**12 + 3)))
    assert sorted(journaled(agent)) == [1, 2, 3, 4]
    assert journaled(agent)[2]["q"] == 10**12 + 11


def test_the_restore_note_lasts_while_resending_and_a_day_after(agent: Agent,
                                                                clock: FakeClock) -> None:
    """`agent status` says the server was restored while changes it sent again wait for
    the server (however long the device stays offline) and for a day after they all left
    the outbox; then the line is gone and --json says the replay is past."""
    for i in range(1, 4):
        agent.put("tasks", f"t-{i}", {"route": S, "status": "a"})
    agent.sync.apply_ack(ack((1, S, 10), (2, S, 11), (3, S, 12)))
    agent.put("tasks", "t-4", {"route": S})  # n 4: pending, never acked
    assert agent.sync.execute_command(restore("r-1", {S: 10}))
    assert outbox_numbers(agent) == [2, 3, 4]

    def note() -> str | None:
        return next((part for part in agent.status().summary().split("; ")
                     if "restored from a backup" in part), None)

    replayed = agent.status().replayed
    assert replayed is not None
    assert (replayed["resending"], replayed["settled"], replayed["past"]) == (True, None, False)
    assert "sending 2 acked changes again, not all acked yet" in (note() or "")
    clock.advance(3 * DAY_S)  # offline for days: still under way, still said
    agent.sync.apply_ack(ack((2, S, 20)))
    assert agent.status().replayed["resending"]  # type: ignore[index]
    acked = clock.ms
    agent.sync.apply_reject(wire.Reject(rj=[  # the last one refused for good: over too
        wire.Rejection(n=3, code="rule_rejected", reason="no", perm=True)]))
    replayed = agent.status().replayed
    assert replayed is not None
    assert (replayed["resending"], replayed["settled"], replayed["past"]) == (False, acked,
                                                                              False)
    assert (note() or "").endswith("2 acked changes sent again")
    assert outbox_numbers(agent) == [4]  # a change written before the restore: no matter
    clock.advance(DAY_S - 1)
    assert note() is not None
    clock.advance(2)
    assert note() is None
    replayed = agent.status().replayed
    assert replayed is not None and replayed["past"] and replayed["changes"] == 2
    assert replayed["settled"] == acked  # kept for --json and the local API


def test_a_restore_note_from_an_older_agent_counts_from_the_replay(agent: Agent,
                                                                  clock: FakeClock) -> None:
    """A replay recorded before `settled` was kept (no `last_n` either): a day after it."""
    agent._core.write(lambda work: work.tx.set_meta(journal.REPLAY_KEY, {
        "t": clock.ms, "id": "r-0", "changes": 4, "units_skipped": 0, "scopes": {S: 4}}))
    assert "4 acked changes sent again" in agent.status().summary()
    clock.advance(DAY_S + 1)
    assert "restored" not in agent.status().summary()
    assert agent.status().replayed["past"]  # type: ignore[index]


@pytest.mark.parametrize("args", [
    {"why": "restore"},                                   # a server from before §9.7
    {"why": "operator", "seqs": {S: 0}},                  # not a restore
    {"why": "restore", "seqs": [S, 0]},                   # hostile / malformed below
    {"why": "restore", "seqs": {S: -1}},
    {"why": "restore", "seqs": {S: "0"}},
    {"why": "restore", "seqs": {S: True}},
    {"why": "restore", "seqs": {S: -(2**40)}},
    {"why": "restore", "seqs": {"": 0}},
    {"why": "restore", "seqs": {"x" * 200: 0}},
    {"why": "restore", "seqs": {S: 1.5}},
    {},
])
def test_resync_without_usable_seqs_replays_nothing(agent: Agent, args: Any) -> None:
    """Anything but a well-formed `seqs` of a restore: a resync as before (a guess could
    apply a change twice on a server that no longer remembers it)."""
    agent.put("tasks", "t-1", {"route": S, "status": "a"})
    agent.sync.apply_ack(ack((1, S, 10)))
    assert agent.sync.execute_command(wire.Command(id="r-1", cmd="resync", args=args))
    assert agent.pending() == [] and sorted(journaled(agent)) == [1]
    assert agent.get("tasks", "t-1") is None  # the resync dropped the base
    assert agent.status().replayed is None


def test_a_restore_command_is_a_valid_v1_command() -> None:
    """The wire stays v1: the published JSON Schema of `command` and the decoder every
    agent runs take `seqs` (an agent from before §9.7 ignores the member)."""
    doc = {"type": "command", "v": 1, "id": "resync-1", "cmd": "resync",
           "args": {"why": "restore", "seqs": {S: 10, D: 0}}}
    schema = json.loads((Path(schemas.__file__).parent / "json" / "command.json").read_text())
    jsonschema.validators.validator_for(schema)(schema).validate(doc)
    msg = codec.decode(orjson.dumps(doc))
    assert isinstance(msg, wire.Command) and journal.parse_seqs(msg.args) == {S: 10, D: 0}


def test_seqs_beyond_the_protocol_range_are_refused() -> None:
    assert journal.parse_seqs({"why": "restore", "seqs": {S: 2**60}}) is None
    assert journal.parse_seqs({"why": "restore", "seqs": {S: 2**53 - 1}}) == {S: 2**53 - 1}
    assert journal.parse_seqs({"why": "restore", "seqs": {}}) == {}


def test_a_transaction_goes_back_whole(agent: Agent) -> None:
    with agent.transaction() as tx:
        tx.put("tasks", "t-1", {"route": S, "status": "a"})
        tx.put("tasks", "t-2", {"route": S, "status": "b"})
        tx.put("tasks", "t-3", {"route": S, "status": "c"})
    sent = entries(agent)
    assert sent[1]["x"] == [1, 3]
    # Acked in two messages; the second member's q says "in the backup" on its own.
    agent.sync.apply_ack(ack((1, S, 21), (2, S, 20)))
    agent.sync.apply_ack(ack((3, S, 22)))
    assert agent.sync.execute_command(restore("r-1", {S: 20}))
    assert outbox_numbers(agent) == [1, 2, 3]
    assert all(entries(agent)[n]["x"] == [1, 3] for n in (1, 2, 3))
    batch = agent.sync.next_batch(txn=True)
    assert batch.numbers == [1, 2, 3] and all(ch["tx"] == [1, 3] for _, ch in batch)


def test_a_unit_with_a_member_pruned_is_not_replayed(small: Agent, clock: FakeClock) -> None:
    with small.transaction() as tx:
        tx.put("tasks", "t-1", {"route": S, "status": "a"})
        tx.put("tasks", "t-2", {"route": S, "status": "b"})
    small.sync.apply_ack(ack((1, S, 5)))
    clock.advance(2 * DAY_S)
    small.sync.apply_ack(ack((2, S, 6)))  # prunes n 1, past the window
    assert sorted(journaled(small)) == [2]
    assert small.sync.execute_command(restore("r-1", {S: 0}))
    assert small.pending() == []
    replayed = small.status().replayed
    assert replayed is not None and replayed["units_skipped"] == 1
    assert replayed["changes"] == 0 and not replayed["resending"]
    assert ("0 acked changes sent again; 1 transaction could not be sent again"
            in small.status().summary())


def test_prune_keeps_the_window(small: Agent, clock: FakeClock) -> None:
    for i in range(1, 6):
        small.put("tasks", f"t-{i}", {"route": S, "status": "x"})
        small.sync.apply_ack(ack((i, S, i)))
        clock.advance(DAY_S / 4)
    assert sorted(journaled(small)) == [1, 2, 3, 4, 5]
    clock.advance(DAY_S / 2)  # n 1..3 acked more than a day ago
    assert small._core.write(lambda w: journal.prune(w, small._core.settings.journal)) == 3
    assert sorted(journaled(small)) == [4, 5]
    status = small.status()
    assert status.journal["changes"] == 2
    assert status.journal["bytes"] == sum(len(_raw(d)) for d in journaled(small).values())


def test_the_daemon_expires_entries_when_no_ack_comes(small: Agent,
                                                      clock: FakeClock) -> None:
    """Acks prune as they add; the daemon's retention pass expires the rest."""
    small.put("tasks", "t-1", {"route": S})
    small.sync.apply_ack(ack((1, S, 1)))
    stub = SimpleNamespace(sync=small.sync, dev="van-1")
    RetentionHooks._prune_journal(stub)  # type: ignore[arg-type]
    assert sorted(journaled(small)) == [1]  # within the window
    clock.advance(DAY_S + 1)
    RetentionHooks._prune_journal(stub)  # type: ignore[arg-type]
    assert journaled(small) == {} and small.status().journal == {"changes": 0, "bytes": 0}


def test_prune_keeps_the_byte_cap_in_bounded_steps(small: Agent, clock: FakeClock) -> None:
    big = "z" * 1900
    last = 700
    for i in range(1, last + 1):  # ~1.4 MB acked: over the 1 MiB cap
        small.put("tasks", f"t-{i % 7}", {"route": S, "notes": big})
        if i % 50 == 0:
            small.sync.apply_ack(ack(*((n, S, n) for n in range(i - 49, i + 1))))
    held = journaled(small)
    total = sum(len(_raw(d)) for d in held.values())
    assert total <= 1 << 20
    assert 0 < len(held) < last
    assert sorted(held) == list(range(last + 1 - len(held), last + 1))  # the newest kept
    assert small.status().journal == {"changes": len(held), "bytes": total}
    # Bounded: one prune call drops at most its budget.
    limits = Limits(keep_ms=0, max_bytes=1 << 20)  # switched off: everything goes
    assert small._core.write(lambda w: journal.prune(w, limits, budget=3)) == 3
    assert len(journaled(small)) == len(held) - 3


def test_no_journal_when_switched_off(tmp_path: Path, catalog: Catalog,
                                      clock: FakeClock) -> None:
    ag = Agent.open(_cfg(tmp_path / "off", acked_journal_days=0), catalog, now_ms=clock)
    try:
        ag.put("tasks", "t-1", {"route": S})
        ag.sync.apply_ack(ack((1, S, 1)))
        assert journaled(ag) == {} and ag.status().journal == {"changes": 0, "bytes": 0}
        assert ag.sync.execute_command(restore("r-1", {S: 0}))
        assert ag.pending() == []
    finally:
        ag.close()


def test_the_journal_is_sealed_on_an_encrypted_store(tmp_path: Path, catalog: Catalog,
                                                     clock: FakeClock) -> None:
    key = tmp_path / "key"
    key.write_bytes(b"k" * 32)
    key.chmod(0o600)
    cfg = AgentConfig.model_validate({"device_id": "van-1", "data_dir": tmp_path / "enc",
                                      "scopes": [S], "storage": {
                                          "encryption_key_file": str(key)}})
    ag = Agent.open(cfg, catalog, now_ms=clock)
    try:
        ag.put("tasks", "t-1", {"route": S, "notes": "secret-note-text"})
        ag.sync.apply_ack(ack((1, S, 1)))
        assert journaled(ag)[1]["e"]["ch"]["f"]["notes"] == "secret-note-text"
    finally:
        ag.close()
    data = (tmp_path / "enc" / "agent.lmdb" / "data.mdb").read_bytes()
    assert b"secret-note-text" not in data


def _raw(doc: dict[str, Any]) -> bytes:
    return orjson.dumps(doc)


# ---------------------------------------------------------------- selection

_scopes = st.sampled_from(["a", "b", "c"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_scopes, st.integers(1, 50)), max_size=40),
       st.dictionaries(_scopes, st.integers(0, 50)))
def test_selection_is_exactly_the_changes_above_the_restored_seq(
        changes: list[tuple[str, int]], restored: dict[str, int]) -> None:
    entries = [Journaled(n, s, q) for n, (s, q) in enumerate(changes, start=1)]
    chosen = select(entries, restored)
    assert chosen.replay == [e.n for e in entries
                             if e.s not in restored or e.q > restored[e.s]]
    assert chosen.incomplete_units == []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 4), st.integers(1, 50), st.booleans()), max_size=12),
       st.integers(0, 50))
def test_selection_keeps_units_whole(units: list[tuple[int, int, bool]], seq: int) -> None:
    """Units of consecutive numbers, all members at one q (the server applies a unit in
    one transaction) or with one member missing: a unit goes back whole or not at all."""
    entries: list[Journaled] = []
    n = 1
    expect: list[int] = []
    skipped: list[int] = []
    for count, q, missing in units:
        members = list(range(n, n + count))
        held = members[:-1] if missing else members
        entries += [Journaled(m, "a", q, (n, count)) for m in held]
        if q > seq and held:
            if missing:
                skipped.append(n)
            else:
                expect += members
        n += count
    chosen = select(entries, {"a": seq})
    assert chosen.replay == expect and chosen.incomplete_units == skipped


def test_a_replay_with_nothing_to_send_says_so() -> None:
    """A restore that found nothing this device had to send again says that, not
    "0 acked changes sent again"."""
    from agent.status import describe_replay

    text = describe_replay({"t": 0, "changes": 0})
    assert "nothing the backup lacked" in text and "0 acked" not in text
    assert describe_replay({"t": 0, "changes": 1}).endswith("1 acked change sent again")
