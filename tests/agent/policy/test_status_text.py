"""How `agent status` words each deferral (agent.status.describe_deferral)."""

from __future__ import annotations

from agent.policy import Conditions, Rules, decide
from agent.status import describe_deferral

T = 1_764_928_800_000  # 2025-12-05 10:00:00 UTC


def test_each_code_reads_as_a_reason() -> None:
    down = decide(Rules(), Conditions(now_ms=T, server_up=False, server_down_since_ms=T))
    assert describe_deferral(down.deferrals[0].to_dict()).startswith(
        "server unavailable since 2025-12-05T10:00:00Z")
    closed = decide(Rules(), Conditions(now_ms=T, window_open=False,
                                        window_change_ms=T + 3_600_000))
    assert describe_deferral(closed.deferrals[0].to_dict()) == (
        "outside the sync windows until 2025-12-05T11:00:00Z")
    metered = decide(Rules(), Conditions(now_ms=T, metered=True))
    assert describe_deferral(metered.deferrals[0].to_dict()) == (
        "the link is metered: only records go (files, telemetry wait)")


def test_unknown_or_partial_documents_still_read() -> None:
    """A policy document from another version (unknown code, members missing) is shown
    by its reason or code, never an error."""
    assert describe_deferral({"code": "future_thing"}) == "future_thing"
    assert describe_deferral({"code": "server_unavailable"}).startswith("server unavailable:")
