"""`broker.server.announce.server_down`: which announcements a server over AMQP answers
with its own (PROTOCOL.md §7.12; broker/server/announcer.py), pure; and its side link's
construction when `[mqtt] tls` cannot be loaded."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from broker.server.announce import server_down, state_payload, state_topic
from broker.server.announcer import side_announcer
from waystation.config import ServerConfig

ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True)
PREFIX = "waystation"


@given(group=ids, srv=ids, t=st.one_of(st.none(), st.integers(1, 2**53 - 1)))
def test_only_a_server_of_the_group_going_down_is_answered(
        group: str, srv: str, t: int | None) -> None:
    """A server's `on: false` (its will: no `t`; its clean stop) of the group is
    answered; its `on: true` and a cleared (empty) announcement are not."""
    topic = state_topic(PREFIX, group, srv)

    def down(payload: bytes) -> bool:
        return server_down(topic, payload, prefix=PREFIX, group=group)

    assert down(state_payload(group, srv, False, t)) is True
    assert down(state_payload(group, srv, True, t)) is False
    assert down(b"") is False


@given(group=ids, other=ids, srv=ids)
def test_other_groups_prefixes_and_mismatched_members_are_not_answered(
        group: str, other: str, srv: str) -> None:
    """An announcement of another group or prefix, or whose `grp`/`srv` differ from its
    topic, changes nothing."""
    down = state_payload(group, srv, False, None)
    if other != group:
        assert not server_down(state_topic(PREFIX, group, srv), down, prefix=PREFIX,
                               group=other)
        assert not server_down(state_topic(PREFIX, other, srv), down, prefix=PREFIX,
                               group=other)
    assert not server_down(state_topic("elsewhere", group, srv), down, prefix=PREFIX,
                           group=group)
    if other != srv:
        assert not server_down(state_topic(PREFIX, group, other), down, prefix=PREFIX,
                               group=group)


@given(payload=st.binary(max_size=5000))
def test_garbage_is_not_answered(payload: bytes) -> None:
    """Whatever bytes arrive on a server's state topic, only a valid `on: false` counts."""
    topic = state_topic(PREFIX, "main", "server-2")
    assert server_down(topic, payload, prefix=PREFIX, group="main") is False


def test_a_will_as_written_by_hand_is_answered() -> None:
    """The wire form of PROTOCOL.md §7.12, not only what state_payload writes."""
    assert server_down("waystation/_server/main/s2/state",
                       b'{"type":"server","v":1,"grp":"main","srv":"s2","on":false}',
                       prefix=PREFIX, group="main")
    assert not server_down("waystation/_server/main/s2/state/x",
                           b'{"type":"server","v":1,"grp":"main","srv":"s2","on":false}',
                           prefix=PREFIX, group="main")


def test_unloadable_tls_files_leave_the_server_merging_without_announcing(
        tmp_path: Path) -> None:
    """A `[mqtt] tls` CA file that cannot be read: no side link (the server merges over
    AMQP without it), and the log says why and what to do."""
    cfg = ServerConfig.model_validate({
        "amqp": {"nodes": ["127.0.0.1:5672"]},
        "mqtt": {"tls": {"ca_file": str(tmp_path / "missing-ca.pem")}}})
    with capture_logs() as logs:
        assert side_announcer(cfg, env={}) is None
    [event] = [e for e in logs if e["event"] == "announce_link_unusable"]
    assert event["tls_files"] == [str(tmp_path / "missing-ca.pem")]
    assert "FileNotFoundError" in event["reason"]
    assert "[mqtt] tls" in event["hint"] and "announce = false" in event["hint"]
