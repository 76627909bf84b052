"""The design's broker ACL as a pure function (broker.embedded.acl.allowed)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.embedded.acl import allowed, mosquitto_acl_lines

SERVERS = frozenset({"waystation-server"})


def ok(user: str | None, topic: str, action: str, prefix: str = "waystation") -> bool:
    return allowed(user, topic, action, prefix=prefix, server_users=SERVERS)


@pytest.mark.parametrize("topic,action,expected", [
    ("waystation/van-12/up", "publish", True),
    ("waystation/van-12/status", "publish", True),
    ("waystation/van-12/down", "publish", False),
    ("waystation/van-7/up", "publish", False),
    ("waystation/van-7/status", "publish", False),
    ("waystation/van-7/down", "publish", False),
    ("waystation/van-12/up/extra", "publish", False),
    ("waystation/van-12", "publish", False),
    ("other/van-12/up", "publish", False),
    ("waystation/van-12/down", "subscribe", True),
    ("waystation/van-12/up", "subscribe", False),
    ("waystation/van-12/status", "subscribe", False),
    ("waystation/van-7/down", "subscribe", False),
    ("waystation/+/down", "subscribe", False),
    ("waystation/van-12/+", "subscribe", False),
    ("waystation/van-12/#", "subscribe", False),
    ("waystation/#", "subscribe", False),
    ("#", "subscribe", False),
    ("+/van-12/down", "subscribe", False),
    ("$share/g/waystation/van-12/down", "subscribe", False),
    ("waystation/van-12/down", "receive", True),
    ("waystation/van-7/status", "receive", True),
    ("waystation/van-12/status", "receive", True),
    ("waystation/van-7/down", "receive", False),
    ("waystation/van-7/up", "receive", False),
    ("waystation/van-12/up", "receive", False),
    ("waystation/a/b/status", "receive", False),
    ("waystation/van-12/up", "connect", False),
    ("waystation/_server/main/+/state", "subscribe", True),
    ("waystation/_server/main/server-1/state", "subscribe", True),
    ("waystation/_server/main/server-1/state", "receive", True),
    ("waystation/_server/main/server-1/state", "publish", False),
    ("waystation/_server/main/+/state", "receive", False),
    ("waystation/_server/+/+/state", "subscribe", False),
    ("waystation/_server/#", "subscribe", False),
    ("waystation/_server/main/server-1/other", "receive", False),
    ("waystation/_server/main/state", "receive", False),
    ("waystation/_server/main/a/b/state", "subscribe", False),
])
def test_device_rules(topic: str, action: str, expected: bool) -> None:
    """A device publishes its own up/status, subscribes to its own down, hears down + status."""
    assert ok("van-12", topic, action) is expected


@pytest.mark.parametrize("topic,action,expected", [
    ("waystation/van-12/down", "publish", True),
    ("waystation/van-12/up", "publish", True),
    ("waystation/x", "publish", True),
    ("waystation/+/down", "publish", False),
    ("elsewhere/van-12/down", "publish", False),
    ("waystation", "publish", False),
    ("waystation/+/up", "subscribe", True),
    ("waystation/+/status", "subscribe", True),
    ("waystation/#", "subscribe", True),
    ("$share/merge/waystation/+/up", "subscribe", True),
    ("$share//waystation/+/up", "subscribe", False),
    ("$share/merge", "subscribe", False),
    ("$share/merge/elsewhere/#", "subscribe", False),
    ("#", "subscribe", False),
    ("+/+/up", "subscribe", False),
    ("waystation/a#", "subscribe", False),
    ("waystation/#/up", "subscribe", False),
    ("waystation/a+/up", "subscribe", False),
    ("$SYS/#", "subscribe", False),
    ("waystation/van-12/up", "receive", True),
    ("elsewhere/x", "receive", False),
])
def test_server_rules(topic: str, action: str, expected: bool) -> None:
    """A server user may do anything under the prefix, shared subscriptions included."""
    assert ok("waystation-server", topic, action) is expected


@pytest.mark.parametrize("user", [None, ""])
@pytest.mark.parametrize("topic,action", [
    ("waystation/van-12/up", "publish"), ("waystation/van-12/down", "subscribe"),
    ("waystation/van-12/status", "receive"), ("#", "subscribe"),
])
def test_anonymous_may_do_nothing(user: str | None, topic: str, action: str) -> None:
    """No username: every action is refused."""
    assert ok(user, topic, action) is False


@pytest.mark.parametrize("user", ["+", "#", "a/b", "-x", "a" * 65, "van 1", "$SYS"])
def test_usernames_that_are_not_device_ids_get_nothing(user: str) -> None:
    """A username that could act as a wildcard or span levels is refused everything."""
    for topic in (f"waystation/{user}/up", f"waystation/{user}/status"):
        assert ok(user, topic, "publish") is False
    assert ok(user, f"waystation/{user}/down", "subscribe") is False


def test_prefix_is_configurable_and_may_have_levels() -> None:
    """All rules follow the configured prefix, even one with several levels."""
    assert ok("van-12", "acme/fleet/van-12/up", "publish", prefix="acme/fleet")
    assert not ok("van-12", "waystation/van-12/up", "publish", prefix="acme/fleet")
    assert ok("van-12", "acme/fleet/van-7/status", "receive", prefix="acme/fleet")
    assert ok("waystation-server", "$share/g/acme/fleet/+/up", "subscribe", prefix="acme/fleet")


device_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,15}", fullmatch=True)


@given(me=device_ids, other=device_ids, leaf=st.sampled_from(["up", "down", "status"]))
def test_no_device_can_act_for_another(me: str, other: str, leaf: str) -> None:
    """For any two distinct device ids, one may neither publish nor subscribe as the other."""
    if me == other:
        return
    topic = f"waystation/{other}/{leaf}"
    assert not ok(me, topic, "publish")
    assert not ok(me, topic, "subscribe")
    if leaf != "status":
        assert not ok(me, topic, "receive")


def test_mosquitto_lines_are_the_pattern_acl() -> None:
    """The generated acl_file grants devices their own topics by %u and servers the prefix."""
    lines = mosquitto_acl_lines(prefix="waystation", server_users={"srv-b", "srv-a"})
    rules = [line for line in lines if line and not line.startswith("#")]
    assert rules == [
        "pattern write waystation/%u/up",
        "pattern write waystation/%u/status",
        "pattern read waystation/%u/down",
        "pattern read waystation/_server/+/+/state",
        "user srv-a", "topic readwrite waystation/#",
        "user srv-b", "topic readwrite waystation/#",
    ]
