"""The agent's side of capability negotiation (PROTOCOL.md §11): it offers its features
in every hello and uses only what the server's welcome agreed to."""

from __future__ import annotations

from typing import Any

import pytest

from agent import caps as agent_caps
from agent.api import Agent
from schemas import wire


def test_hello_offers_the_agents_features(agent: Agent) -> None:
    assert agent.sync.hello("t/1").caps == sorted(agent_caps.AGENT_CAPS)


def test_nothing_is_agreed_before_a_welcome(agent: Agent) -> None:
    assert agent.sync.server_caps is None


def test_welcome_agrees_only_to_what_was_offered(agent: Agent,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("agent.sync.AGENT_CAPS", frozenset({"alpha"}))
    got = agent.sync.apply_welcome(wire.Welcome(caps=["alpha", "omega"], srv="s/9"))
    assert got == frozenset({"alpha"}) == agent.sync.server_caps
    assert agent.sync.apply_welcome(wire.Welcome(caps=[])) == frozenset()


def test_the_agent_offers_the_compact_encoding(agent: Agent) -> None:
    assert "zd1" in (agent.sync.hello("t/1").caps or [])


def test_batches_use_the_dictionary_only_when_asked(agent: Agent) -> None:
    from schemas import codec, zdict

    agent.put("tasks", "t-1", {"route": "route-42", "notes": "left with neighbour " * 5})
    batch = agent.sync.next_batch((), 10, 100_000)
    plain = batch.payload("van-1", compress_over=512)
    packed = batch.payload("van-1", compress_over=512, zdict=True)
    assert plain[:1] == b"{"
    assert zdict.wants_dictionary(packed) == zdict.DICT_ID and len(packed) < len(plain)
    assert codec.decode(packed) == codec.decode(plain)


def test_the_daemon_compresses_with_the_dictionary_only_once_agreed(
        tmp_path: Any, catalog: Any) -> None:
    from agent.daemon import AgentDaemon
    from tests.agent.agentkit import make_cfg

    daemon = AgentDaemon(make_cfg(tmp_path / "d"), catalog, env={})
    try:
        assert not daemon._zdict(), "nothing agreed before a welcome"
        daemon.sync.apply_welcome(wire.Welcome(caps=["txn"], srv="s/1"))
        assert not daemon._zdict(), "a server without zd1 gets plain JSON and zlib"
        daemon.sync.apply_welcome(wire.Welcome(caps=["txn", "zd1"], srv="s/1"))
        assert daemon._zdict()
        daemon._say_hello()  # a new connection: agreed anew
        assert not daemon._zdict()
    finally:
        daemon.agent.close()


def test_the_agent_names_its_schema_dictionary_in_hello(agent: Agent, catalog: Any) -> None:
    from schemas import zdict_schema

    msg = agent.sync.hello("t/1")
    assert "zd2" in (msg.caps or [])
    assert msg.zd == zdict_schema.dict_id(zdict_schema.dictionary(catalog))


def test_the_daemon_uses_the_schema_dictionary_only_once_agreed(
        tmp_path: Any, catalog: Any) -> None:
    from agent.daemon import AgentDaemon
    from schemas import zdict_schema
    from tests.agent.agentkit import make_cfg

    data = zdict_schema.dictionary(catalog)
    daemon = AgentDaemon(make_cfg(tmp_path / "d"), catalog, env={})
    try:
        daemon._say_hello()
        assert not daemon._zdict(), "nothing agreed before a welcome"
        daemon.sync.apply_welcome(wire.Welcome(caps=["zd1"], srv="s/1"))
        assert daemon._zdict() is True, "a server without zd2: the zd1 dictionary"
        daemon._say_hello()
        daemon.sync.apply_welcome(wire.Welcome(caps=["zd1", "zd2"], srv="s/1"))
        assert daemon._zdict() == data
        # the server could not read it after all: back to zd1 on this connection
        daemon._on_reject(wire.Reject(rj=[], err={"code": "malformed", "reason": "x"}))
        assert daemon._zdict() is True
        daemon._say_hello()  # a new connection: agreed anew
        assert not daemon._zdict()
    finally:
        daemon.agent.close()
