"""Scopes changed by the server (`scopes` command, PROTOCOL.md §7.9; agent.scopes): what
leaves the device, what it keeps, what it asks for next, and who wins against the config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import scopes
from agent.api import Agent
from agent.errors import WriteRefused
from schemas import wire
from schemas.collection import Catalog
from tests.agent.agentkit import FakeClock, assert_views_consistent, make_cfg, outbox_numbers, rec

R42, R9 = "route-42", "route-9"
IDS = st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True)


def _page(scope: str, to: int, recs: list[wire.Rec]) -> wire.Page:
    return wire.Page.model_validate({"req": "c-1", "s": scope, "from": 0, "to": to,
                                     "reset": False, "more": False, "recs": recs})


def _command(new: Any, cid: str = "scopes-1") -> wire.Command:
    return wire.Command(id=cid, cmd="scopes", args={"scopes": new})


def test_removed_scope_leaves_but_own_pending_writes_stay(agent: Agent) -> None:
    agent.sync.apply_page(_page(R42, 2, [rec("t-1", 1, {"route": R42, "notes": "a"}),
                                         rec("t-2", 2, {"route": R42, "notes": "b"})]))
    agent.put("tasks", "t-2", {"notes": "mine"})
    assert agent.sync.execute_command(_command(["depot-7", "fleet", R9]))
    assert agent.get("tasks", "t-1") is None
    kept = agent.get("tasks", "t-2")
    assert kept is not None and kept.fields == {"notes": "mine"}, "the pending write stays"
    assert outbox_numbers(agent) == [1]
    req = agent.sync.catchup_request("c-2")
    assert req.cp == {"depot-7": 0, "fleet": 0, R9: 0}
    assert agent.sync.hello("t/1").cp == {"depot-7": 0, "fleet": 0, R9: 0}
    with pytest.raises(WriteRefused) as refused:
        agent.put("tasks", "t-3", {"route": R42})
    assert refused.value.code == "scope_denied"
    agent.put("tasks", "t-4", {"route": R9})
    assert_views_consistent(agent)


def test_a_scope_added_back_is_caught_up_from_zero(agent: Agent) -> None:
    agent.sync.apply_page(_page(R42, 5, [rec("t-1", 5, {"route": R42})]))
    assert agent.sync.execute_command(_command(["fleet"], "s-1"))
    assert agent.sync.execute_command(_command(["fleet", R42], "s-2"))
    assert agent.sync.catchup_request("c-3").cp == {"fleet": 0, R42: 0}
    assert agent.get("tasks", "t-1") is None


def test_the_command_is_carried_out_once(agent: Agent) -> None:
    assert agent.sync.execute_command(_command(["fleet"]))
    assert not agent.sync.execute_command(_command([R42]))  # same id: already done
    assert agent.status().checkpoints.keys() == {"fleet"}


@pytest.mark.parametrize("bad", [[], "fleet", ["bad scope"], [1], None,
                                 [f"s{i}" for i in range(scopes.MAX_SCOPES + 1)]])
def test_a_malformed_list_changes_nothing_and_is_not_run_again(agent: Agent, bad: Any) -> None:
    before = agent.status().checkpoints.keys()
    cmd = wire.Command(id="scopes-x", cmd="scopes", args={"scopes": bad} if bad else {})
    assert agent.sync.execute_command(cmd)
    assert agent.status().checkpoints.keys() == before
    assert agent.sync.command_done("scopes-x")


def test_the_list_survives_reopening_until_the_config_is_edited(
        tmp_path: Path, catalog: Catalog, clock: FakeClock) -> None:
    data = tmp_path / "data"
    with Agent.open(make_cfg(data), catalog, now_ms=clock) as ag:
        ag.sync.execute_command(_command([R9]))
    with Agent.open(make_cfg(data), catalog, now_ms=clock) as ag:
        assert ag.sync.catchup_request("c").cp == {R9: 0}, "the server's list is kept"
    with Agent.open(make_cfg(data, scopes=(R42,)), catalog, now_ms=clock) as ag:
        assert ag.sync.catchup_request("c").cp == {R42: 0}, "an edited config wins"


@given(st.lists(IDS, min_size=1, max_size=5, unique=True),
       st.lists(IDS, min_size=1, max_size=5, unique=True))
def test_effective_follows_whichever_changed_last(configured: list[str], server: list[str]) -> None:
    doc = {"set": server, "cfg": configured}
    assert scopes.effective(doc, tuple(configured)) == tuple(server)
    edited = (*configured, "zz-new")
    assert scopes.effective(doc, edited) == edited
    assert scopes.effective(None, tuple(configured)) == tuple(configured)
    assert scopes.effective({"set": "x"}, tuple(configured)) == tuple(configured)


@given(st.lists(IDS, min_size=1, max_size=20))
def test_parse_keeps_order_and_drops_duplicates(given_scopes: list[str]) -> None:
    assert scopes.parse({"scopes": given_scopes}) == tuple(dict.fromkeys(given_scopes))
