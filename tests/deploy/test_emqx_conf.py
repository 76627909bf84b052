"""deploy/emqx: the files parse and say what the design needs (read only: no EMQX here).

EMQX is not installed on the project's machines (no package, no container engine), so
these tests never start it. They parse emqx.conf with a small HOCON-subset reader and
acl.conf's Erlang rule terms, and evaluate the rules the way EMQX's file authorizer
does (first match wins, ${username} substituted, $share/<group>/ stripped) against the
ACL that tests/deploy/test_mosquitto_conf.py checks on a real Mosquitto.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
EMQX_CONF = REPO / "deploy" / "emqx" / "emqx.conf"
ACL_CONF = REPO / "deploy" / "emqx" / "acl.conf"
SERVER = "waystation-server"


# ------------------------------------------------------------------ a HOCON subset

_TOKEN = re.compile(r'''
    (?P<space>[ \t\r]+)
  | (?P<newline>\n)
  | (?P<comment>(?:\#|//)[^\n]*)
  | (?P<string>"(?:[^"\\\n]|\\.)*")
  | (?P<punct>[{}\[\]=:,])
  | (?P<word>[^\s{}\[\]=:,"#]+)
''', re.VERBOSE)


def _tokens(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        assert match, f"cannot read HOCON at {text[pos:pos + 30]!r}"
        kind = match.lastgroup
        assert kind is not None
        if kind not in ("space", "comment"):
            out.append((kind, match.group()))
        pos = match.end()
    return out


class _Reader:
    """Reads objects, arrays, strings and bare values; keys may be dotted paths."""

    def __init__(self, text: str) -> None:
        self.toks = _tokens(text)
        self.i = 0

    def _skip(self, *kinds: str) -> None:
        while self.i < len(self.toks) and self.toks[self.i][1] in kinds:
            self.i += 1

    def _peek(self) -> str | None:
        return self.toks[self.i][1] if self.i < len(self.toks) else None

    def _take(self) -> tuple[str, str]:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def document(self) -> dict[str, Any]:
        body = self._members(end=None)
        assert self.i == len(self.toks), "trailing tokens"
        return body

    def _members(self, end: str | None) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        while True:
            self._skip("\n", ",")
            if self._peek() == end:
                if end is not None:
                    self.i += 1
                return obj
            kind, key = self._take()
            assert kind in ("word", "string"), f"expected a key, got {key!r}"
            path = key.strip('"').split(".") if kind == "word" else [key.strip('"')]
            if self._peek() in ("=", ":"):
                self.i += 1
                self._skip("\n")
            else:
                assert self._peek() == "{", f"{key}: expected '=', ':' or '{{'"
            _merge(obj, path, self._value())

    def _value(self) -> Any:
        kind, tok = self._take()
        if tok == "{":
            return self._members(end="}")
        if tok == "[":
            items: list[Any] = []
            while True:
                self._skip("\n", ",")
                if self._peek() == "]":
                    self.i += 1
                    return items
                items.append(self._value())
        if kind == "string":
            return tok[1:-1]
        assert kind == "word", f"unexpected {tok!r}"
        return {"true": True, "false": False}.get(tok, int(tok) if tok.isdigit() else tok)


def _merge(obj: dict[str, Any], path: list[str], value: Any) -> None:
    for key in path[:-1]:
        obj = obj.setdefault(key, {})
    if isinstance(value, dict) and isinstance(obj.get(path[-1]), dict):
        for k, v in value.items():
            _merge(obj[path[-1]], [k], v)
    else:
        obj[path[-1]] = value


def parse_hocon(text: str) -> dict[str, Any]:
    """The document as nested dicts (a subset of HOCON: no includes, no substitutions
    outside strings, no concatenation)."""
    return _Reader(text).document()


def get(conf: dict[str, Any], dotted: str) -> Any:
    """conf["a"]["b"]["c"] for "a.b.c" (KeyError names the path)."""
    node: Any = conf
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            raise KeyError(dotted)
        node = node[key]
    return node


# ------------------------------------------------------------------ the ACL rules

_RULE = re.compile(r"^\{(allow|deny),\s*(.*)\}\.\s*$")


def parse_acl(text: str) -> list[tuple[str, Any, str, list[str]]]:
    """(permission, who, action, topics) for each rule; who is "all" or ("username", x)."""
    rules = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("%%")[0].strip()
        if not line:
            continue
        match = _RULE.match(line)
        assert match, f"acl.conf line {number}: not a rule EMQX's file authorizer reads"
        permission, rest = match.groups()
        if rest == "all":
            rules.append((permission, "all", "all", ["#"]))
            continue
        who_match = re.match(r'^(all|\{username,\s*"([^"]+)"\}),\s*(publish|subscribe|all),'
                             r'\s*\[(.*)\]$', rest)
        assert who_match, f"acl.conf line {number}: unexpected rule shape"
        who: Any = "all" if who_match.group(1) == "all" else ("username", who_match.group(2))
        topics = re.findall(r'"([^"]+)"', who_match.group(4))
        rules.append((permission, who, who_match.group(3), topics))
    return rules


def _matches(subject: str, rule_filter: str) -> bool:
    """EMQX topic matching: wildcards in the rule match levels of the subject; a
    wildcard in the subject (a subscription filter) is only matched by a wildcard."""
    s_levels, r_levels = subject.split("/"), rule_filter.split("/")
    if subject.startswith("$") and r_levels[0] in ("+", "#"):
        return False
    for index, level in enumerate(r_levels):
        if level == "#":
            return True
        if index >= len(s_levels):
            return False
        if level != "+" and level != s_levels[index]:
            return False
    return len(s_levels) == len(r_levels)


def authorize(rules: list[tuple[str, Any, str, list[str]]], username: str, action: str,
              topic: str) -> bool:
    """What EMQX decides for `username` doing `action` on `topic` (no_match = deny)."""
    if action == "subscribe" and topic.startswith("$share/"):
        topic = topic.split("/", 2)[2]
    for permission, who, rule_action, topics in rules:
        if who != "all" and who != ("username", username):
            continue
        if rule_action not in ("all", action):
            continue
        for rule_topic in topics:
            if _matches(topic, rule_topic.replace("${username}", username)):
                return permission == "allow"
    return False


# (username, action, topic, allowed?) — the design's ACL, as Mosquitto enforces it.
EXPECTED = [
    ("van-1", "publish", "waystation/van-1/up", True),
    ("van-1", "publish", "waystation/van-1/status", True),
    ("van-1", "subscribe", "waystation/van-1/down", True),
    ("van-1", "publish", "waystation/van-2/up", False),
    ("van-1", "publish", "waystation/van-2/status", False),
    ("van-1", "publish", "waystation/van-1/down", False),
    ("van-1", "publish", "waystation/van-2/down", False),
    ("van-1", "subscribe", "waystation/van-2/down", False),
    ("van-1", "subscribe", "waystation/+/down", False),
    ("van-1", "subscribe", "waystation/#", False),
    ("van-1", "subscribe", "#", False),
    ("van-1", "subscribe", "waystation/van-2/status", False),
    ("van-1", "subscribe", "waystation/+/status", False),
    ("van-1", "subscribe", "$share/g/waystation/+/up", False),
    ("van-1", "subscribe", "$SYS/brokers", False),
    ("van-1", "publish", "elsewhere/topic", False),
    (SERVER, "subscribe", "$share/waystation/waystation/+/up", True),
    (SERVER, "subscribe", "waystation/+/up", True),
    (SERVER, "subscribe", "waystation/+/status", True),
    (SERVER, "publish", "waystation/van-1/down", True),
    (SERVER, "publish", "elsewhere/topic", False),
    (SERVER, "subscribe", "$SYS/#", False),
    ("van-1", "subscribe", "waystation/_server/main/+/state", True),
    ("van-1", "subscribe", "waystation/_server/main/server-1/state", True),
    ("van-1", "publish", "waystation/_server/main/server-1/state", False),
    ("van-1", "subscribe", "waystation/_server/#", False),
    (SERVER, "publish", "waystation/_server/main/server-1/state", True),
]


# ------------------------------------------------------------------ tests

def test_files_exist_and_say_they_are_untested() -> None:
    """Both files exist and open with the note that no EMQX ran them here."""
    for path in (EMQX_CONF, ACL_CONF):
        head = path.read_text()[:600]
        assert "NOT TESTED AGAINST A RUNNING EMQX" in head, path


def test_emqx_conf_parses() -> None:
    """emqx.conf is well-formed HOCON (as far as this reader goes) with the expected roots."""
    conf = parse_hocon(EMQX_CONF.read_text())
    assert {"node", "cluster", "listeners", "mqtt", "broker", "authentication",
            "authorization"} <= conf.keys()


def test_emqx_conf_settings() -> None:
    """The settings the design relies on have the values it relies on."""
    conf = parse_hocon(EMQX_CONF.read_text())
    expected: dict[str, Any] = {
        "listeners.tcp.default.tcp_options.nodelay": True,
        "listeners.ssl.default.tcp_options.nodelay": True,
        "listeners.tcp.default.bind": "127.0.0.1:1883",
        "listeners.ssl.default.bind": "0.0.0.0:8883",
        "listeners.ssl.default.ssl_options.versions": ["tlsv1.3", "tlsv1.2"],
        "listeners.ssl.default.zone": "devices",
        "zones.devices.mqtt.use_username_as_clientid": True,
        "broker.shared_subscription_strategy": "hash_topic",
        "mqtt.session_expiry_interval": "30d",
        "mqtt.max_mqueue_len": 100000,
        "mqtt.mqueue_store_qos0": False,
        "mqtt.max_packet_size": "260KB",
        "authorization.no_match": "deny",
        "dashboard.listeners.http.bind": "127.0.0.1:18083",
    }
    for key, value in expected.items():
        assert get(conf, key) == value, key
    assert "cookie" not in get(conf, "node"), "the cookie is a secret: environment only"


def test_emqx_authentication_is_built_in_pbkdf2() -> None:
    """Passwords: built-in database by username, PBKDF2-SHA512 as in our $7$ hashes."""
    conf = parse_hocon(EMQX_CONF.read_text())
    [authn] = get(conf, "authentication")
    assert authn["mechanism"] == "password_based"
    assert authn["backend"] == "built_in_database"
    assert authn["user_id_type"] == "username"
    assert authn["password_hash_algorithm"] == {
        "name": "pbkdf2", "mac_fun": "sha512", "iterations": 101, "dk_length": 64}


def test_emqx_authorization_uses_the_acl_file() -> None:
    """The only authorization source is acl.conf."""
    conf = parse_hocon(EMQX_CONF.read_text())
    [source] = get(conf, "authorization.sources")
    assert source["type"] == "file" and source["enable"] is True
    assert source["path"].endswith("/acl.conf")


def test_acl_conf_has_the_design_rules() -> None:
    """acl.conf allows own up/status/down by ${username}, the prefix to the server, nothing else."""
    rules = parse_acl(ACL_CONF.read_text())
    assert ("allow", "all", "publish",
            ["waystation/${username}/up", "waystation/${username}/status"]) in rules
    assert ("allow", "all", "subscribe", ["waystation/${username}/down"]) in rules
    assert ("allow", ("username", SERVER), "all", ["waystation/#"]) in rules
    assert rules[-1] == ("deny", "all", "all", ["#"])
    assert not any(p == "allow" and who == "all" and topics == ["#"]
                   for p, who, _, topics in rules), "no blanket allow"


@pytest.mark.parametrize("username,action,topic,allowed", EXPECTED,
                         ids=[f"{u}-{a}-{t}" for u, a, t, _ in EXPECTED])
def test_acl_conf_decides_like_the_mosquitto_acl(username: str, action: str, topic: str,
                                                 allowed: bool) -> None:
    """Evaluated as EMQX does, acl.conf gives the same answers as deploy/mosquitto/acl."""
    assert authorize(parse_acl(ACL_CONF.read_text()), username, action, topic) is allowed


def test_hocon_reader_rejects_broken_input() -> None:
    """The reader is strict enough to catch an unbalanced brace or a missing value."""
    assert parse_hocon('a { b = 1\n c.d = "x" }\na.e = [1, 2]') == {
        "a": {"b": 1, "c": {"d": "x"}, "e": [1, 2]}}
    with pytest.raises((AssertionError, IndexError)):
        parse_hocon("a { b = 1")
    with pytest.raises((AssertionError, IndexError)):
        parse_hocon("a = ")
