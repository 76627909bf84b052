"""The agent's side of capability negotiation (PROTOCOL.md §11): it offers its features
in every hello and uses only what the server's welcome agreed to."""

from __future__ import annotations

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
