"""`broker.server.announce.peer_down`: which announcements a server over AMQP answers with
its own (PROTOCOL.md §7.12; broker/server/announcer.py), pure; and its side link's
construction when `[mqtt] tls` cannot be loaded."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from broker.server.announce import group_filter, peer_down, state_payload, state_topic
from broker.server.announcer import side_announcer
from waystation.config import ServerConfig

ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True)
PREFIX = "waystation"


@given(group=ids, own=ids, peer=ids, t=st.one_of(st.none(), st.integers(1, 2**53 - 1)))
def test_only_another_server_of_the_group_going_down_is_answered(
        group: str, own: str, peer: str, t: int | None) -> None:
    """Another server's `on: false` of the own group is answered; its `on: true`, a
    cleared (empty) one and the server's own announcements are not."""
    topic = state_topic(PREFIX, group, peer)
    down = state_payload(group, peer, False, t)
    up = state_payload(group, peer, True, t)

    def check(topic: str, payload: bytes) -> bool:
        return peer_down(topic, payload, prefix=PREFIX, group=group, own_id=own)

    assert check(topic, down) is (peer != own)
    assert check(topic, up) is False
    assert check(topic, b"") is False


@given(group=ids, other=ids, peer=ids, own=ids)
def test_other_groups_prefixes_and_mismatched_members_are_not_answered(
        group: str, other: str, peer: str, own: str) -> None:
    """An announcement of another group or prefix, or whose `grp`/`srv` differ from its
    topic, changes nothing."""
    down = state_payload(group, peer, False, None)
    if other != group:
        assert not peer_down(state_topic(PREFIX, other, peer), down, prefix=PREFIX,
                             group=other, own_id=own)
    assert not peer_down(state_topic("elsewhere", group, peer), down, prefix=PREFIX,
                         group=group, own_id=own)
    if other != peer and other != own:
        assert not peer_down(state_topic(PREFIX, group, other), down, prefix=PREFIX,
                             group=group, own_id=own)


@given(payload=st.binary(max_size=5000))
def test_garbage_is_not_answered(payload: bytes) -> None:
    """Whatever bytes arrive on a peer's state topic, only a valid `on: false` counts."""
    topic = state_topic(PREFIX, "main", "server-2")
    assert peer_down(topic, payload, prefix=PREFIX, group="main", own_id="server-1") is False


def test_the_group_filter_covers_every_state_topic() -> None:
    """The side link listens where devices do."""
    assert group_filter(PREFIX, "main") == "waystation/_server/main/+/state"
    assert peer_down(state_topic(PREFIX, "main", "s2"), b'{"type":"server","v":1,'
                     b'"grp":"main","srv":"s2","on":false}', prefix=PREFIX, group="main",
                     own_id="s1")


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
