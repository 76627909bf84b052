"""The pure MQTT 3.1.1 checks of the embedded broker (broker/embedded/protocol_checks.py)
and the log-line bound (broker/embedded/log_limits.shorten), as properties."""

from __future__ import annotations

import logging
import struct
import unicodedata
from collections.abc import Iterator

from hypothesis import given
from hypothesis import strategies as st

from broker.embedded.acl import allowed
from broker.embedded.log_limits import FIELD_MAX, LINE_MAX, shorten
from broker.embedded.protocol_checks import (
    ConnectHeaderCheck,
    ConnectStringsCheck,
    PublishTopicCheck,
    Refusal,
    connect_header_refusal,
    fixed_header_violation,
    mqtt_string_violation,
    subscribe_qos_violation,
    topic_filter_violation,
    topic_name_violation,
)


def _chunks(data: bytes, cuts: list[int]) -> Iterator[bytes]:
    start = 0
    for cut in sorted(c % (len(data) + 1) for c in cuts):
        yield data[start:cut]
        start = cut
    yield data[start:]


def _fed(check: ConnectHeaderCheck | ConnectStringsCheck | PublishTopicCheck, data: bytes,
         cuts: list[int]) -> object:
    """What `check` says about `data` arriving in the pieces `cuts` makes (the first
    refusal; None when there is none)."""
    for piece in _chunks(data, cuts):
        verdict = check.feed(piece)
        if verdict is not None:
            return verdict
    return None


NAMES = st.sampled_from([b"MQTT", b"MQIsdp", b"FOO", b"", b"MQTTv5"])
CUTS = st.lists(st.integers(min_value=0, max_value=400), max_size=6)


@given(name=NAMES, level=st.integers(0, 255), flags=st.integers(0, 255), cuts=CUTS,
       tail=st.binary(max_size=40))
def test_a_connect_header_is_judged_the_same_however_it_arrives(
        name: bytes, level: int, flags: int, cuts: list[int], tail: bytes) -> None:
    """The verdict on a CONNECT's protocol name, level and flags does not depend on how
    TCP cut its bytes, nor on what follows them."""
    header = struct.pack("!H", len(name)) + name + bytes([level, flags])
    assert _fed(ConnectHeaderCheck(), header + tail, cuts) \
        == connect_header_refusal(name, level, flags)


FIELD = st.one_of(st.text(max_size=8).map(str.encode), st.binary(max_size=8))


def _field(raw: bytes) -> bytes:
    return struct.pack("!H", len(raw)) + raw


@given(flags=st.integers(0, 255), client_id=FIELD, will_topic=FIELD, will=st.binary(max_size=8),
       user=FIELD, password=st.binary(max_size=8), cuts=CUTS, tail=st.binary(max_size=8))
def test_connect_strings_are_judged_the_same_however_they_arrive(
        flags: int, client_id: bytes, will_topic: bytes, will: bytes, user: bytes,
        password: bytes, cuts: list[int], tail: bytes) -> None:
    """A CONNECT is refused for its first string field (client id, will topic, user
    name: those its flags say it carries) that is not UTF-8 or holds U+0000, however TCP
    cut its bytes; the will message and the password, binary data, never."""
    body = _field(b"MQTT") + bytes([4, flags]) + b"\x00\x3c" + _field(client_id)
    strings = [("client id", client_id)]
    if flags & 0x04:
        body += _field(will_topic) + _field(will)
        strings.append(("will topic", will_topic))
    if flags & 0x80:
        body += _field(user)
        strings.append(("user name", user))
    if flags & 0x40:
        body += _field(password)
    expected = next((Refusal(f"CONNECT whose {name} {why}") for name, raw in strings
                     if (why := mqtt_string_violation(raw)) is not None), None)
    assert _fed(ConnectStringsCheck(), body + tail, cuts) == expected


def _noncharacter(char: str) -> bool:
    """Unicode's 66 non-characters (U+FDD0..U+FDEF and the last two of each plane)."""
    code = ord(char)
    return 0xFDD0 <= code <= 0xFDEF or code % 0x10000 in (0xFFFE, 0xFFFF)


@given(text=st.text(max_size=20) | st.text(st.sampled_from(
    "ab\x00\x01\x1f\x20\x7e\x7f\x9f\xa0\ufdcf\ufdd0\ufdef\ufdf0\ufffd\ufffe\uffff"
    "\U0001fffe\U0010ffff\U0010fffd"), max_size=6))
def test_an_mqtt_string_is_utf8_without_nul_or_discouraged_characters(text: str) -> None:
    """Any text encodes to a valid MQTT string unless it holds U+0000, a control
    character or a non-character (the first one is named; Python's text may hold lone
    surrogates: their bytes are not UTF-8)."""
    try:
        raw = text.encode()
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogatepass")
        assert mqtt_string_violation(raw) == "is not UTF-8"
        return
    if "\x00" in text:
        expected: str | None = "holds U+0000"
    else:
        first = next((c for c in text
                      if unicodedata.category(c) == "Cc" or _noncharacter(c)), None)
        expected = None if first is None else f"holds U+{ord(first):04X} (a " + (
            "control character)" if unicodedata.category(first) == "Cc"
            else "Unicode non-character)")
    assert mqtt_string_violation(raw) == expected


@given(level=st.integers(0, 255).filter(lambda n: n != 4))
def test_another_mqtt_level_gets_connack_1(level: int) -> None:
    """Any protocol level but 4 under the name MQTT is refused with CONNACK 0x01."""
    refusal = connect_header_refusal(b"MQTT", level, 0x02)
    assert refusal is not None and refusal.connack == 0x01


@given(flags=st.integers(0, 255))
def test_connect_flags_refused_exactly_as_the_spec_says(flags: int) -> None:
    """An MQTT 3.1.1 CONNECT is refused for its flags iff the reserved bit is set, the
    will QoS is 3, or a will QoS or retain comes without the will flag."""
    will, qos, retain = flags & 0x04, (flags >> 3) & 3, flags & 0x20
    bad = bool(flags & 0x01 or qos == 3 or (not will and (qos or retain)))
    assert (connect_header_refusal(b"MQTT", 4, flags) is not None) == bad


@given(byte=st.integers(0, 255))
def test_only_a_connect_may_come_first_and_never_again(byte: int) -> None:
    """A packet is accepted first iff it is a CONNECT with flags 0, and a CONNECT is
    never accepted after the first packet."""
    assert (fixed_header_violation(byte, first_packet=True) is None) == (byte == 0x10)
    if byte >> 4 == 1:
        assert fixed_header_violation(byte, first_packet=False) is not None


@given(flags=st.integers(0, 15))
def test_a_publish_is_refused_for_qos_3_only(flags: int) -> None:
    """PUBLISH's flags (DUP, QoS, RETAIN) are free except QoS 3."""
    refused = fixed_header_violation(0x30 | flags, first_packet=False) is not None
    assert refused == (flags & 0x06 == 0x06)


@given(topic=st.text(max_size=30), cuts=CUTS, payload=st.binary(max_size=30))
def test_a_publish_topic_is_judged_the_same_however_it_arrives(
        topic: str, cuts: list[int], payload: bytes) -> None:
    """The verdict on a PUBLISH's topic name does not depend on how its bytes arrive."""
    raw = topic.encode()
    data = struct.pack("!H", len(raw)) + raw + payload
    assert _fed(PublishTopicCheck(), data, cuts) == topic_name_violation(topic)


@given(raw=st.binary(min_size=1, max_size=20))
def test_a_topic_that_is_not_utf8_is_refused(raw: bytes) -> None:
    """Bytes that do not decode as UTF-8 are refused as a topic name."""
    check = PublishTopicCheck()
    verdict = check.feed(struct.pack("!H", len(raw)) + raw)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        assert verdict == "PUBLISH to a topic that is not UTF-8"


@given(topic=st.text(alphabet="ab/+#\x00$", max_size=12))
def test_a_topic_name_with_a_wildcard_or_nul_is_refused(topic: str) -> None:
    """A topic name is refused iff it is empty or has a wildcard or NUL."""
    bad = not topic or any(c in topic for c in "+#\x00")
    assert (topic_name_violation(topic) is not None) == bad


@given(topic_filter=st.text(alphabet="ab/+#", min_size=1, max_size=12))
def test_a_filter_the_server_may_use_is_well_formed(topic_filter: str) -> None:
    """Every filter the ACL lets a server user subscribe to is well formed here (the
    checks never refuse what the ACL grants)."""
    full = f"waystation/{topic_filter}"
    if allowed("waystation-server", full, "subscribe", prefix="waystation",
               server_users={"waystation-server"}):
        assert topic_filter_violation(full) is None


@given(qos=st.integers(0, 255))
def test_subscribe_qos_above_2_is_refused(qos: int) -> None:
    """A requested QoS byte is refused iff it is not 0, 1 or 2."""
    assert (subscribe_qos_violation(qos) is None) == (qos <= 2)


@given(size=st.integers(0, 70_000))
def test_a_long_log_field_or_line_is_cut(size: int) -> None:
    """A structured field and a plain line are cut to their bound, with the length said."""
    event = logging.makeLogRecord({"msg": {"event": "refused", "client_id": "v" * size}})
    shorten(event)
    assert len(event.msg["client_id"]) <= FIELD_MAX + 40
    plain = logging.makeLogRecord({"msg": "refused %s", "args": ("v" * size,)})
    shorten(plain)
    assert len(plain.getMessage()) <= LINE_MAX + 40
