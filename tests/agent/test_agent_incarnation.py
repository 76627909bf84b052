"""Store incarnations on the device (PROTOCOL.md §2): created with every store, carried on
the wire, switched when the server says a change id was re-used; and the on-disk format
1 stores of the first release, opened and migrated in place."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import orjson

from agent.api import Agent
from agent.store import FORMAT_VERSION
from schemas import codec, wire
from schemas.collection import Catalog
from schemas.wire import INCARNATION_PATTERN
from tests.agent.agentkit import make_cfg

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def _inc(ag: Agent) -> str:
    inc = ag.sync.hello("test/0").inc
    assert inc is not None
    return inc


def test_every_new_store_has_its_own_incarnation(tmp_path: Path, catalog: Catalog) -> None:
    """Two stores of one device (a re-imaged device, a second data_dir) never share one."""
    with Agent.open(make_cfg(tmp_path / "a"), catalog) as one:
        first = _inc(one)
    with Agent.open(make_cfg(tmp_path / "b"), catalog) as two:
        second = _inc(two)
    assert re.fullmatch(INCARNATION_PATTERN, first)
    assert re.fullmatch(INCARNATION_PATTERN, second)
    assert first != second
    with Agent.open(make_cfg(tmp_path / "a"), catalog) as again:
        assert _inc(again) == first  # reopening keeps it


def test_changes_carry_the_incarnation_they_were_written_in(agent: Agent) -> None:
    """A batch and its wire message name the writing incarnation."""
    agent.put("tasks", "t-1", {"route": "route-42", "status": "open"})
    batch = agent.sync.next_batch()
    assert batch.inc == _inc(agent)
    assert orjson.loads(batch.payload(agent.device_id))["inc"] == batch.inc
    assert batch.message(agent.device_id).inc == batch.inc


def test_id_reused_starts_a_new_incarnation(agent: Agent) -> None:
    """The server refusing a re-used id dead-letters the change, switches incarnation,
    says why in status; later writes use the new one, older pending keep theirs."""
    agent.put("tasks", "t-1", {"route": "route-42", "status": "open"})
    agent.put("tasks", "t-2", {"route": "route-42", "status": "open"})
    old = _inc(agent)
    result = agent.sync.apply_reject(wire.Reject(rj=[wire.Rejection(
        n=1, code=codec.ID_REUSED, reason="already applied with other content", perm=True)]))
    assert result.dead == [1]
    new = _inc(agent)
    assert new != old
    letters = agent.dead_letters()
    assert [(d.n, d.code) for d in letters] == [(1, "id_reused")]
    status = agent.status()
    assert status.last_error is not None and status.last_error["code"] == "id_reused"
    assert "restored from a backup or copied" in status.last_error["reason"]
    agent.put("tasks", "t-3", {"route": "route-42", "status": "open"})
    first = agent.sync.next_batch()
    assert (first.inc, first.numbers) == (old, [2])  # the old incarnation's pending change
    second = agent.sync.next_batch(exclude_n={2})
    assert (second.inc, second.numbers) == (new, [3])
    retried = agent.retry_dead_letter(1)
    assert retried.n == 4
    assert agent.sync.next_batch(exclude_n={2, 3}).inc == new


def test_a_second_id_reused_of_the_old_incarnation_keeps_the_new_one(agent: Agent) -> None:
    """Refusals of changes of an incarnation already left behind do not switch again."""
    agent.put("tasks", "t-1", {"route": "route-42", "status": "open"})
    agent.put("tasks", "t-2", {"route": "route-42", "status": "open"})
    agent.sync.apply_reject(wire.Reject(rj=[wire.Rejection(
        n=1, code=codec.ID_REUSED, reason="x", perm=True)]))
    new = _inc(agent)
    agent.sync.apply_reject(wire.Reject(rj=[wire.Rejection(
        n=2, code=codec.ID_REUSED, reason="x", perm=True)]))
    assert _inc(agent) == new
    assert [d.n for d in agent.dead_letters()] == [1, 2]


def _format1_store(tmp_path: Path) -> Path:
    data_dir = tmp_path / "data"
    (data_dir / "agent.lmdb").mkdir(parents=True)
    shutil.copy(FIXTURES / "agent_format1" / "data.mdb", data_dir / "agent.lmdb" / "data.mdb")
    return data_dir


def test_format1_store_of_the_first_release_opens_and_migrates(
        tmp_path: Path, catalog: Catalog) -> None:
    """A store written by the first release (committed fixture) opens with its data,
    becomes format 2, and its pending changes go out in the legacy incarnation."""
    data_dir = _format1_store(tmp_path)
    cfg = make_cfg(data_dir, device="van-old", scopes=("route-1", "depot-1"))
    with Agent.open(cfg, catalog) as ag:
        t1 = ag.get("tasks", "t-1")
        assert t1 is not None and t1.fields["status"] == "open" and t1.version == 1
        t3 = ag.get("tasks", "t-3")
        assert t3 is not None and t3.fields == {"route": "route-1", "status": "late",
                                                "attempts": 2}
        i1 = ag.get("inventory", "i-1")
        assert i1 is not None and i1.fields["tags"] == ["fragile"]
        assert [e["ch"]["n"] for e in ag.pending()] == [2, 3, 4, 5, 6]
        legacy = ag.sync.next_batch()
        assert legacy.inc is None and legacy.numbers == [2, 3, 4, 5, 6]
        assert "inc" not in orjson.loads(legacy.payload(ag.device_id))
        written = ag.put("tasks", "t-9", {"route": "route-1", "status": "open"})
        assert written.n == 7  # numbering goes on: n never repeats within a store
        fresh = ag.sync.next_batch(exclude_n=set(legacy.numbers))
        assert fresh.numbers == [7] and fresh.inc == _inc(ag)
    import lmdb

    env = lmdb.open(str(data_dir / "agent.lmdb"), max_dbs=16, readonly=True)
    with env.begin() as txn:
        meta = env.open_db(b"meta", txn=txn, create=False)
        assert orjson.loads(txn.get(b"format", db=meta)) == FORMAT_VERSION == 2
    env.close()
