"""What MQTT 3.1.1 says a server must refuse, and amqtt 0.12.1 let through: pure checks
on a client's packets for the embedded broker (no I/O; `broker.embedded.packet_limit`
feeds them the bytes it reads, `broker.embedded.amqtt_overrides` the parsed packets).

Measured over TCP against amqtt 0.12.1 (Mosquitto 2.0.11 closes the connection for
every one of these unless said otherwise):

- **Fixed-header flags** other than the spec's (MQTT-2.2.2-2: CONNECT 0x10 sent as 0x11,
  SUBSCRIBE 0x80, PUBREL 0x60, PINGREQ 0xC1), or a packet only a server sends (CONNACK,
  SUBACK, UNSUBACK, PINGRESP): amqtt carried on. The connection is closed now.
- **CONNECT of another protocol**: an MQTT 5 CONNECT (level 5) was parsed as 3.1.1, its
  properties byte read as the client id's length, and dropped as malformed with no
  CONNACK, so the client retried for ever without learning why; MQTT 3.1 (``MQIsdp``,
  level 3) was dropped with no CONNACK either. Both get CONNACK 0x01 (unacceptable
  protocol version, MQTT-3.1.2-2; the same 4 bytes in 3.1, and paho's MQTT 5 client
  reads them as "unsupported protocol version") and the log says what to change.
  Mosquitto speaks both. An unknown protocol name is closed without a CONNACK
  (MQTT-3.1.2-1).
- **CONNECT flags that contradict each other**: a will QoS of 3, or a will QoS or will
  retain without the will flag (MQTT-3.1.2-11/13/14/15): amqtt accepted them.
- **SUBSCRIBE asking for QoS 3** (or with the reserved bits of its QoS byte set,
  MQTT-3.8.3-4): amqtt granted "QoS 3" in its SUBACK.
- **CONNECT strings that are not MQTT strings**: a client id, will topic or user name
  that is not well-formed UTF-8 (a stray byte, a surrogate, an overlong form) or holds
  U+0000 (MQTT-1.5.3-1/-2: the server must close the connection). amqtt turned the
  bytes into the text of their repr and the login failed: CONNACK 5, "not
  authorized", as if the password were wrong. Closed without a CONNACK now, as by
  Mosquitto; so are the characters the spec only says SHOULD NOT be sent
  (U+0001-U+001F, U+007F-U+009F, non-characters), which Mosquitto refuses as well. (The
  password is binary data in 3.1.1: not checked.)
- **Topic filters and names used wrongly**: a ``#`` that is not the last level, a ``+``
  sharing a level, an empty filter or topic, a NUL character (MQTT-1.5.3-2, 4.7.1,
  3.3.2-2), a PUBLISH to a topic with a wildcard: amqtt refused filters through the ACL
  only (a server user could subscribe with a NUL), and a PUBLISH to a wildcard topic got
  no PUBACK and left the connection open.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ConnectHeaderCheck", "ConnectStringsCheck", "PublishTopicCheck", "Refusal",
           "fixed_header_violation", "mqtt_string_violation", "subscribe_qos_violation",
           "topic_filter_violation", "topic_name_violation"]

CONNECT, PUBLISH, PUBREL, SUBSCRIBE, UNSUBSCRIBE = 1, 3, 6, 8, 10
_FLAGS_TWO = (PUBREL, SUBSCRIBE, UNSUBSCRIBE)
"""Packet types whose fixed-header flags must be 0b0010 (MQTT 3.1.1 §2.2.2)."""
_SERVER_ONLY = {2: "CONNACK", 9: "SUBACK", 11: "UNSUBACK", 13: "PINGRESP"}
UNACCEPTABLE_PROTOCOL_VERSION = 0x01
"""CONNACK return code 1, the same in MQTT 3.1 and 3.1.1."""


@dataclass(frozen=True)
class Refusal:
    """Why a client's packet is refused; `connack` is the return code to send first
    (None: close without a CONNACK); `hint` tells the operator what to do."""

    reason: str
    connack: int | None = None
    hint: str = ""


def fixed_header_violation(first_byte: int, *, first_packet: bool) -> str | None:
    """Why a packet starting with `first_byte` (type and flags) is refused, or None.
    `first_packet`: nothing was read on this connection before it."""
    kind, flags = first_byte >> 4, first_byte & 0x0F
    if kind in (0, 15):
        return f"reserved packet type {kind}"
    if first_packet != (kind == CONNECT):
        # MQTT-3.1.0-1 and -2: CONNECT first, and only once
        return ("a second CONNECT on an open connection" if kind == CONNECT
                else f"packet type {kind} before CONNECT")
    if kind in _SERVER_ONLY:
        return f"{_SERVER_ONLY[kind]} sent by a client"
    if kind == PUBLISH:
        return "PUBLISH with QoS 3" if flags & 0x06 == 0x06 else None
    expected = 0x02 if kind in _FLAGS_TWO else 0x00
    if flags != expected:
        return f"packet type {kind} with fixed-header flags {flags:#06b} (must be {expected:#06b})"
    return None


_MQTT5_HINT = ("the client speaks MQTT 5; the embedded broker speaks MQTT 3.1.1 only: set "
               "the client to MQTT 3.1.1 (paho: protocol=MQTTv311), or run Mosquitto")
_MQTT31_HINT = ("the client speaks MQTT 3.1; the embedded broker speaks MQTT 3.1.1 only: "
                "set the client to MQTT 3.1.1 (paho: protocol=MQTTv311)")


class ConnectHeaderCheck:
    """Reads a CONNECT's first bytes as they arrive (after the fixed header: protocol
    name, level, flags) and refuses what MQTT 3.1.1 refuses, before the payload is
    parsed (an MQTT 5 CONNECT's payload is not one 3.1.1 can parse)."""

    __slots__ = ("_buffer", "done")

    _LONGEST_NAME = 6  # "MQIsdp"

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.done = False

    def feed(self, data: bytes) -> Refusal | None:
        """Account for the next bytes of the CONNECT's variable header; a Refusal once
        they show one. Once it has judged (`done`) it ignores what follows."""
        if self.done:
            return None
        self._buffer += data[: 2 + self._LONGEST_NAME + 2 - len(self._buffer)]
        buf = self._buffer
        if len(buf) < 2:
            return None
        name_len = int.from_bytes(buf[:2], "big")
        if name_len > self._LONGEST_NAME:
            self.done = True
            return Refusal(f"unknown protocol name ({name_len} bytes long)")
        if len(buf) < 2 + name_len + 2:
            return None
        self.done = True
        name = bytes(buf[2:2 + name_len])
        level, flags = buf[2 + name_len], buf[3 + name_len]
        return connect_header_refusal(name, level, flags)


def mqtt_string_violation(raw: bytes) -> str | None:
    """Why `raw` is not an MQTT 3.1.1 string (§1.5.3), or None: ill-formed UTF-8
    (Python's strict decoder also refuses surrogates and overlong forms), U+0000, or a
    code point the spec says SHOULD NOT be sent (`discouraged`)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "is not UTF-8"
    if "\x00" in text:
        return "holds U+0000"
    bad = discouraged(text)
    return None if bad is None else f"holds {bad}"


def discouraged(text: str) -> str | None:
    """The first character of `text` MQTT-1.5.3-4 discourages, named (a control
    character, U+0001-U+001F or U+007F-U+009F, or a non-character), or None. Mosquitto
    2.0.11 closes a connection whose CONNECT strings hold one; so does the embedded
    broker, so that a device tried against it is not refused in production."""
    for char in text:
        code = ord(char)
        if code <= 0x1F or 0x7F <= code <= 0x9F:
            return f"U+{code:04X} (a control character)"
        if 0xFDD0 <= code <= 0xFDEF or code & 0xFFFE == 0xFFFE:
            return f"U+{code:04X} (a Unicode non-character)"
    return None


_CONNECT_VARIABLE_HEADER = 10
"""A 3.1.1 CONNECT's bytes before its payload: "MQTT" (2 + 4), level, flags, keepalive (2)."""
_CONNECT_FLAGS_AT = 7


class ConnectStringsCheck:
    """Follows a 3.1.1 CONNECT's body (after the fixed header) as its bytes arrive and
    refuses it once a client id, will topic or user name turns out not to be an MQTT
    string (`mqtt_string_violation`). Only those fields are held (64 KiB at most each);
    the will message and the password are binary data, skipped. The header is
    `ConnectHeaderCheck`'s to judge: this one assumes "MQTT" level 4."""

    __slots__ = ("_fields", "_head", "_length", "_text", "_want", "done")

    def __init__(self) -> None:
        self._head = bytearray()
        self._fields: list[tuple[str, bool]] | None = None
        """(name, is a string) of the payload fields still to come, once the flags are known."""
        self._length = bytearray()
        self._text = bytearray()
        self._want = -1  # the current field's bytes still to come; -1: its length first
        self.done = False

    def feed(self, data: bytes) -> Refusal | None:
        """Account for the next bytes of the CONNECT's body; a Refusal once a string is
        complete and is not one. Once it has judged (`done`) it ignores what follows."""
        view = memoryview(data)
        while view and not self.done:
            if self._fields is None:
                take = _CONNECT_VARIABLE_HEADER - len(self._head)
                self._head += view[:take]
                view = view[take:]
                if len(self._head) == _CONNECT_VARIABLE_HEADER:
                    self._fields = _connect_fields(self._head[_CONNECT_FLAGS_AT])
                continue
            if self._want < 0:
                take = 2 - len(self._length)
                self._length += view[:take]
                view = view[take:]
                if len(self._length) < 2:
                    continue
                self._want = int.from_bytes(self._length, "big")
            name, text = self._fields[0]
            take = min(self._want, len(view))
            if text:
                self._text += view[:take]
            view = view[take:]
            self._want -= take
            if self._want:
                continue
            why = mqtt_string_violation(bytes(self._text)) if text else None
            del self._fields[0]
            self._length.clear()
            self._text.clear()
            self._want = -1
            self.done = why is not None or not self._fields
            if why is not None:
                return Refusal(f"CONNECT whose {name} {why}")
        return None


def _connect_fields(flags: int) -> list[tuple[str, bool]]:
    """The payload fields a CONNECT with `flags` carries, in order (MQTT-3.1.3-1)."""
    fields = [("client id", True)]
    if flags & 0x04:
        fields += [("will topic", True), ("will message", False)]
    if flags & 0x80:
        fields.append(("user name", True))
    if flags & 0x40:
        fields.append(("password", False))
    return fields


class PublishTopicCheck:
    """Reads a PUBLISH's topic name as its bytes arrive (a 2-byte length, then the
    name) and refuses a malformed one before amqtt parses it: amqtt dropped a PUBLISH to
    a wildcard topic after reading its topic, left its payload unread and parsed that
    as the client's next packets; and it turned a name that is not UTF-8 into the text
    of its bytes' repr (MQTT-1.5.3-1 says close)."""

    __slots__ = ("_buffer", "done")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.done = False

    def feed(self, data: bytes) -> str | None:
        """Account for the next bytes of the PUBLISH's body; why it is refused once its
        topic is complete (None: fine, or not complete yet). Ignores what follows."""
        if self.done:
            return None
        want = 2 if len(self._buffer) + len(data) < 2 else \
            2 + int.from_bytes((bytes(self._buffer) + data)[:2], "big")
        self._buffer += data[: want - len(self._buffer)]
        if len(self._buffer) < want:
            return None
        self.done = True
        try:
            topic = bytes(self._buffer[2:]).decode("utf-8")
        except UnicodeDecodeError:
            return "PUBLISH to a topic that is not UTF-8"
        return topic_name_violation(topic)


def connect_header_refusal(name: bytes, level: int, flags: int) -> Refusal | None:
    """Why a CONNECT with protocol `name`, `level` and connect `flags` is refused."""
    if name == b"MQIsdp" and level == 3:
        return Refusal("MQTT 3.1 CONNECT (MQIsdp, level 3)", UNACCEPTABLE_PROTOCOL_VERSION,
                       _MQTT31_HINT)
    if name != b"MQTT":
        return Refusal(f"unknown protocol name {name!r}")
    if level != 4:
        return Refusal(f"MQTT protocol level {level} (3.1.1 is 4)",
                       UNACCEPTABLE_PROTOCOL_VERSION,
                       _MQTT5_HINT if level == 5 else "the client must speak MQTT 3.1.1")
    will, will_qos, will_retain = bool(flags & 0x04), (flags >> 3) & 0x03, bool(flags & 0x20)
    if flags & 0x01:
        return Refusal("CONNECT with the reserved flag set")
    if will_qos == 3:
        return Refusal("CONNECT with a will QoS of 3")
    if not will and (will_qos or will_retain):
        return Refusal("CONNECT with a will QoS or will retain but no will")
    return None


def subscribe_qos_violation(qos: object) -> str | None:
    """Why a SUBSCRIBE's requested QoS byte is refused (MQTT-3.8.3-4), or None."""
    if qos in (0, 1, 2):
        return None
    return f"SUBSCRIBE asking for QoS {qos!r} (0, 1 or 2; reserved bits must be 0)"


def topic_filter_violation(topic_filter: object) -> str | None:
    """Why a SUBSCRIBE's or UNSUBSCRIBE's topic filter is malformed, or None. Only the
    form is checked here; what a client may subscribe to is the ACL's business."""
    if not isinstance(topic_filter, str) or not topic_filter:
        return "an empty topic filter"
    if "\x00" in topic_filter:
        return "a topic filter with a NUL character"
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            return "a topic filter with '#' that is not its whole last level"
        if "+" in level and level != "+":
            return "a topic filter with '+' sharing a level"
    return None


def topic_name_violation(topic: object) -> str | None:
    """Why a PUBLISH's topic name is malformed (empty, a wildcard, a NUL), or None."""
    if not isinstance(topic, str) or not topic:
        return "PUBLISH to an empty topic"
    if "+" in topic or "#" in topic:
        return "PUBLISH to a topic with a wildcard"
    if "\x00" in topic:
        return "PUBLISH to a topic with a NUL character"
    return None
