"""A catch-up followed to its end (agent.catchup; PROTOCOL.md §7.8, §9.5).

The server sends a `checkpoint` only for a request none of whose scopes said `more`,
listing that request's scopes; a scope complete beside one that needed more pages is in
no checkpoint of the chain. The daemon asks for such scopes again, so every scope is
confirmed - and a snapshot of a scope that fitted one page ends, dropping what the
server no longer holds.
"""

from __future__ import annotations

import tempfile
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.api import Agent
from agent.catchup import CatchupRound
from broker.server.engine import Engine
from broker.server.operations import purge_tombstones
from broker.server.store.base import Store
from schemas import codec, wire
from schemas.collection import Catalog
from tests.agent.agentkit import FakeClock, make_cfg
from tests.server.helpers import T0, changes, make_engine, task

SCOPES = ("r1", "r2", "r3")


# ------------------------------------------------------------------------ the pure round


def test_one_complete_answer_ends_the_round() -> None:
    """The usual case: one checkpoint listing every scope; nothing to ask again."""
    rnd = CatchupRound("c-1", frozenset(SCOPES))
    rnd.on_page("r1", more=False)
    assert rnd.after_checkpoint({"r1": 3, "r2": 0, "r3": 9}) == frozenset()
    assert rnd.done


def test_scope_complete_beside_a_continuing_one_is_asked_for_again() -> None:
    """r1 needs pages, r2 is complete at once: after r1's checkpoint, ask for r2."""
    rnd = CatchupRound("c-1", frozenset({"r1", "r2"}))
    rnd.on_page("r1", more=True)
    rnd.on_page("r1", more=False)
    assert rnd.after_checkpoint({"r1": 5}) == {"r2"}
    assert not rnd.done
    assert rnd.after_checkpoint({"r2": 0}) == frozenset() and rnd.done


def test_nothing_is_asked_while_a_continuation_is_out() -> None:
    """Two scopes continuing: the first one's checkpoint waits for the other's."""
    rnd = CatchupRound("c-1", frozenset(SCOPES))
    rnd.on_page("r1", more=True)
    rnd.on_page("r2", more=True)
    assert rnd.after_checkpoint({"r1": 4}) == frozenset()
    assert rnd.after_checkpoint({"r2": 4}) == {"r3"}
    assert rnd.after_checkpoint({"r3": 1}) == frozenset() and rnd.done


def test_denied_scopes_count_as_answered() -> None:
    """A scope the server denies is answered: the round ends without it in `cp`."""
    rnd = CatchupRound("c-1", frozenset({"r1", "r9"}))
    assert rnd.after_checkpoint({"r1": 2}, ["r9"]) == frozenset() and rnd.done


# ------------------------------------------------------------------------ against the engine


class Device:
    """The daemon's catch-up steps (agent/daemon.py) over an in-process engine."""

    def __init__(self, agent: Agent, engine: Engine) -> None:
        self.agent, self.engine = agent, engine
        self.sync = agent.sync
        self.round: CatchupRound | None = None
        self.requests = 0
        self.inbox: deque[bytes] = deque()
        self._n = 0

    def catch_up(self) -> None:
        """Start a catch-up and handle the answers, in arrival order, until none is left."""
        self.start()
        while self.inbox:
            self._receive(codec.decode(self.inbox.popleft(), allowed=wire.DOWN_TYPES))

    def start(self) -> None:
        self._n += 1
        req = self.sync.catchup_request(f"c-{self._n}")
        self.round = CatchupRound(req.req, frozenset(req.cp))
        self._send(req)

    def _send(self, msg: wire.Catchup) -> None:
        self.requests += 1
        assert self.requests < 200, "the catch-up does not end"
        for dev, payload in self.engine.handle_up("van-1", codec.encode(msg)):
            if dev == "van-1":
                self.inbox.append(payload)

    def _receive(self, msg: wire.Message) -> None:
        rnd = self.round
        lim = self.agent._core.settings.catchup_page
        if isinstance(msg, wire.Page):
            self.sync.apply_page(msg)
            if rnd is not None and msg.req == rnd.req:
                rnd.on_page(msg.s, msg.more)
            if msg.more:
                cp = self.agent.checkpoints()[msg.s]
                self._send(wire.Catchup(dev="van-1", req=msg.req, cp={msg.s: msg.to},
                                        snap=[msg.s] if cp.snapshot else [], lim=lim))
        elif isinstance(msg, wire.Checkpoint):
            result = self.sync.apply_checkpoint(msg)
            if result.behind:
                self.start()
                return
            if rnd is not None and msg.req == rnd.req:
                again = rnd.after_checkpoint(msg.cp, msg.denied)
                if rnd.done:
                    self.round = None
                elif again:
                    self._send(self.sync.catchup_request(rnd.req, scopes=again))


def _write(engine: Engine, dev: str, chs: list[dict[str, Any]]) -> None:
    out = engine.handle_up(dev, changes(dev, chs))
    answers = [orjson.loads(p) for d, p in out if d == dev]
    assert all(m["type"] == "ack" for m in answers), answers


def _seqs(store: Store) -> dict[str, int]:
    with store.read() as txn:
        return {s: txn.scope_seq(s) for s in SCOPES}


@pytest.fixture
def world(tmp_path: Path, catalog: Catalog) -> Iterator[tuple[Engine, Store, Agent]]:
    engine, store, _ = make_engine(tmp_path / "server", {"van-1": SCOPES, "van-2": SCOPES})
    cfg = make_cfg(tmp_path / "agent", device="van-1", scopes=SCOPES)
    cfg = cfg.model_copy(update={"sync": cfg.sync.model_copy(update={"catchup_page": 2})})
    agent = Agent.open(cfg, catalog, now_ms=FakeClock(T0))
    try:
        yield engine, store, agent
    finally:
        agent.close()
        store.close()


def test_snapshot_of_a_one_page_scope_ends_beside_a_paged_one(
        world: tuple[Engine, Store, Agent]) -> None:
    """r1 must be reset (its tombstone was purged) and fits one page; r2 needs several
    pages. The r1 snapshot still ends: the record deleted meanwhile leaves the device."""
    engine, store, agent = world
    _write(engine, "van-2", [task(1, "gone", "r1", status="a"), task(2, "kept", "r1", status="b"),
                             task(3, "x-1", "r2", status="c")])
    dev = Device(agent, engine)
    dev.catch_up()
    assert dev.round is None and agent.get("tasks", "gone") is not None
    # Meanwhile: `gone` is deleted and its tombstone purged; r2 grows past one page.
    _write(engine, "van-2", [task(4, "gone", "r1", op="del")])
    _write(engine, "van-2", [task(n, f"x-{n}", "r2", status="d") for n in range(5, 12)])
    assert purge_tombstones(store, T0 + 10**9, 0) == 1

    dev.catch_up()
    assert dev.round is None, "the catch-up never ended"
    assert agent.get("tasks", "gone", include_deleted=True) is None
    cps = agent.checkpoints()
    assert {s: cps[s].cp for s in SCOPES} == _seqs(store)
    assert not any(cp.snapshot for cp in cps.values())


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(counts=st.lists(st.integers(0, 7), min_size=3, max_size=3),
       lim=st.integers(1, 3), reset=st.lists(st.booleans(), min_size=3, max_size=3))
def test_every_catchup_ends_with_every_scope_confirmed(catalog: Catalog, counts: list[int],
                                                       lim: int, reset: list[bool]) -> None:
    """Whatever the records per scope, the page size and which scopes need a snapshot,
    the round ends, every checkpoint equals the scope's sequence, no snapshot is left."""
    with tempfile.TemporaryDirectory() as tmp:
        engine, store, _ = make_engine(Path(tmp) / "server", {"van-1": SCOPES,
                                                             "van-2": SCOPES})
        cfg = make_cfg(Path(tmp) / "agent", device="van-1", scopes=SCOPES)
        cfg = cfg.model_copy(update={"sync": cfg.sync.model_copy(update={"catchup_page": lim})})
        agent = Agent.open(cfg, catalog, now_ms=FakeClock(T0))
        try:
            n = 0
            for scope, wants_reset in zip(SCOPES, reset, strict=True):
                if wants_reset:  # a record the device sees, then deleted and purged
                    n += 1
                    _write(engine, "van-2", [task(n, f"{scope}-old", scope, status="a")])
            dev = Device(agent, engine)
            dev.catch_up()
            for scope, count, wants_reset in zip(SCOPES, counts, reset, strict=True):
                if wants_reset:
                    n += 1
                    _write(engine, "van-2", [task(n, f"{scope}-old", scope, op="del")])
                if count:
                    _write(engine, "van-2", [task(n + i, f"{scope}-{n + i}", scope, status="s")
                                             for i in range(1, count + 1)])
                    n += count
            purge_tombstones(store, T0 + 10**9, 0)
            dev.catch_up()
            assert dev.round is None
            cps = agent.checkpoints()
            assert {s: cps[s].cp for s in SCOPES} == _seqs(store)
            assert not any(cp.snapshot for cp in cps.values())
            for scope in SCOPES:
                assert agent.get("tasks", f"{scope}-old", include_deleted=True) is None
        finally:
            agent.close()
            store.close()
