"""The optional protocol features this agent speaks (PROTOCOL.md §11).

Offered in every `hello`; the server's `welcome` says which of them it serves too, and
the agent uses a feature on the wire only once it is agreed (`Sync.server_caps`). A
feature joins `AGENT_CAPS` in the commit that implements it in the agent.
"""

from __future__ import annotations

AGENT_CAPS: frozenset[str] = frozenset({"scopes"})
"""scopes: the `scopes` command (§7.9), the operator changing what the device follows."""

__all__ = ["AGENT_CAPS"]
