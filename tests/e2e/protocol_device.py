"""A minimal Waystation device written from docs/PROTOCOL.md alone.

It uses plain paho-mqtt, json and zlib - nothing from agent/, schemas/ or waystation/ -
so it meets the server exactly as a device written in another language would, and it
can do what a well-behaved agent never does: send duplicates, shuffle batches, split
them, forge members, send garbage.

    dev = ProtocolDevice("pd-1", password, port=1883)
    dev.connect()                         # §1: client id = device id, persistent session,
                                          # will on status; subscribes to its down topic,
                                          # publishes status on:true (retained)
    dev.hello(); dev.catchup()            # §7.1, §7.3
    ch = dev.change("tasks", "t-1", "route-42", f={"status": "out"})   # §7.2, next n
    dev.send_changes([ch])                # one `changes` message
    dev.wait_acked([ch["n"]])             # §7.4 acks, recorded per n
    dev.records[("tasks", "t-1")]         # the base, from ack fx / delta / page (§6)

Everything received is decoded (zlib when the first byte is 0x78, §3) and kept:
`acks` (n -> every (scope, q) it was acked with), `rejections` (n -> every rejection),
`errors` (message-level `err` of rejects), `pages`, `checkpoints`, `deltas`.

Capabilities (§11): `caps=[...]` is offered in every hello and `welcomes` keeps the
answers. The compact encodings zd1/zd2/zd3 (§3) are tests/e2e/protocol_zd.py, written from
the text as well: give the device its collection-schema file's text (`schema=`) to offer
zd2 (`hello.zd`); once a welcome agreed them, up messages are compressed with the zd1 /
zd2 dictionary (`changes` with zd3 references), down streams with the zd1 dictionary
are read, and a `dictionary_unknown` makes it forget its references and send its
unanswered changes again. `sent_how` / `received_how` count the encodings used.
"""

from __future__ import annotations

import contextlib
import json
import ssl
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from tests.e2e.protocol_zd import ZdCodec, first_n

__all__ = ["ProtocolDevice", "Stamper"]

T = TypeVar("T")
PROTOCOL_VERSION = 1


class Stamper:
    """The hybrid logical clock of §4 (time part: 12 hex digits of ms, 4 of counter)."""

    def __init__(self, now_ms: Callable[[], int] | None = None) -> None:
        self._now = now_ms or (lambda: time.time_ns() // 1_000_000)
        self.w = 0
        self.c = 0

    def next(self) -> str:
        """A new stamp for a local write: w' = max(w, now); c' = c + 1 on the same ms."""
        now = self._now()
        if now > self.w:
            self.w, self.c = now, 0
        elif self.c < 0xFFFF:
            self.c += 1
        else:
            self.w, self.c = self.w + 1, 0
        return f"{self.w:012x}{self.c:04x}"

    def observe(self, stamp: str) -> None:
        """Receiving a stamp (full `time:node` or time part): never fall behind it."""
        part = stamp.split(":", 1)[0]
        w_r, c_r = int(part[:12], 16), int(part[12:16], 16)
        if (w_r, c_r) > (self.w, self.c):
            self.w, self.c = w_r, c_r


class ProtocolDevice:
    """One device speaking PROTOCOL.md version 1 over MQTT 3.1.1 (see module docstring)."""

    def __init__(self, dev: str, password: str, *, port: int, host: str = "127.0.0.1",
                 prefix: str = "waystation", scopes: Iterable[str] = (), sv: int = 1,
                 z: bool = True, client_id: str | None = None,
                 tls: ssl.SSLContext | None = None, caps: Iterable[str] | None = None,
                 schema: str | None = None) -> None:
        """`client_id` other than `dev` and `tls` are for tests of the transport (§1);
        `caps` are offered in hello (§11), `schema` is the text of the collection-schema
        file the device runs (for zd2's dictionary, §3)."""
        self.dev, self.password = dev, password
        self.client_id = dev if client_id is None else client_id
        self.tls = tls
        self.host, self.port, self.prefix = host, port, prefix
        self.scopes = list(scopes)
        self.sv, self.z = sv, z
        self.up = f"{prefix}/{dev}/up"
        self.down = f"{prefix}/{dev}/down"
        self.status_topic = f"{prefix}/{dev}/status"
        self.clock = Stamper()
        self.next_n = 1
        self._cond = threading.Condition()
        self._req = 0
        self._lim: int | None = None
        # §9.5: per request id, the scopes asked for, those a checkpoint confirmed, and
        # those whose last page said `more`
        self._asked: dict[str, set[str]] = {}
        self._confirmed: dict[str, set[str]] = {}
        self._continuing: dict[str, set[str]] = {}
        # §9.5: scopes whose snapshot (a `reset` page) a checkpoint has not ended yet;
        # listed in `snap` on every catchup until then
        self.snap: set[str] = set()
        # everything received, decoded
        self.messages: list[dict[str, Any]] = []
        self.undecodable: list[bytes] = []
        self.acks: dict[int, list[tuple[str, int]]] = {}
        self.restamped: set[int] = set()
        self.rejections: dict[int, list[dict[str, Any]]] = {}
        self.errors: list[dict[str, Any]] = []
        self.deltas: list[dict[str, Any]] = []
        self.pages: list[dict[str, Any]] = []
        self.checkpoints: list[dict[str, Any]] = []
        self.records: dict[tuple[str, str], dict[str, Any]] = {}
        self.cp: dict[str, int] = dict.fromkeys(self.scopes, 0)
        self.connacks: list[str] = []
        self.disconnects: list[str] = []
        self.subscribed = False
        self._pubacks: set[int] = set()
        self.caps = None if caps is None else list(caps)
        self.welcomes: list[dict[str, Any]] = []
        self.zd = ZdCodec(schema)
        self.sent_how: Counter[str] = Counter()
        self.received_how: Counter[str] = Counter()
        self.unanswered: dict[int, dict[str, Any]] = {}
        """`changes` messages sent, by their first change's n, until an answer names it."""
        self.client = self._make_client()

    def _make_client(self) -> paho.Client:
        client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                             client_id=self.client_id,
                             clean_session=False, protocol=MQTTProtocolVersion.MQTTv311,
                             reconnect_on_failure=False)
        client.username_pw_set(self.dev, self.password)
        client.will_set(self.status_topic, self._status(False), qos=1, retain=True)
        client.max_inflight_messages_set(100)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        if self.tls is not None:
            client.tls_set_context(self.tls)
        return client

    # ------------------------------------------------------------------ connection

    def connect(self, timeout: float = 10.0, *, online: bool | None = True) -> str:
        """Connect (persistent session, will set), subscribe to down, say online (or,
        with `online=False`, offline: the server then sends it no deltas, §7.6, so it
        learns of others' changes through catch-up alone; `online=None` publishes no
        status at all, §1).

        Returns the CONNACK reason ("Success", "Not authorized", ...)."""
        acks, drops = len(self.connacks), len(self.disconnects)
        self.client.connect(self.host, self.port, keepalive=30)
        self.client.loop_start()
        self.wait(lambda: len(self.connacks) > acks or len(self.disconnects) > drops, timeout,
                  "CONNACK")
        reason = self.connacks[-1] if len(self.connacks) > acks else "no CONNACK"
        if reason != "Success":
            return reason
        self.subscribed = False
        with self._cond:
            self.zd.reset_connection()   # §7.11: nothing agreed until the new welcome
        self.client.subscribe(self.down, qos=1)
        self.wait(lambda: self.subscribed, timeout, "SUBACK")
        if online is not None:
            self.publish(self.status_topic, self._status(online), retain=True)
        return reason

    def restart(self, timeout: float = 10.0) -> str:
        """After the broker dropped us: a new process, as it were - a fresh MQTT client
        (nothing of the old one's in-flight messages) on the same persistent session."""
        self.client.loop_stop()
        self.client = self._make_client()
        return self.connect(timeout)

    @property
    def connected(self) -> bool:
        return self.client.is_connected()

    def close(self) -> None:
        """Say offline and disconnect cleanly."""
        if self.connected:
            with contextlib.suppress(AssertionError):
                self.publish(self.status_topic, self._status(False), retain=True, timeout=5)
            self.client.disconnect()
        self.client.loop_stop()

    def say_online(self, on: bool = True) -> None:
        """Publish the retained status (§7.10)."""
        self.publish(self.status_topic, self._status(on), retain=True)

    def _status(self, on: bool) -> bytes:
        return _encode({"type": "status", "v": PROTOCOL_VERSION, "dev": self.dev, "on": on,
                        "agent": "protocol-device/1", "sv": self.sv})

    # ------------------------------------------------------------------ sending

    def publish(self, topic: str, payload: bytes, *, retain: bool = False,
                timeout: float = 10.0) -> None:
        """QoS 1 publish, waiting for the broker's PUBACK (only the broker's)."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        self.wait(lambda: info.mid in self._pubacks or not self.connected, timeout,
                  f"PUBACK on {topic}")

    def send(self, message: dict[str, Any], *, compress: bool = False) -> None:
        """Publish one protocol message on the up topic."""
        payload = _encode(message)
        if compress:
            payload, how = zlib.compress(payload), "zlib"
        else:
            with self._cond:
                fn = first_n(message)
                payload, how = self.zd.encode(payload, changes_first_n=fn)
                if fn is not None:
                    self.unanswered[fn] = message
        with self._cond:
            self.sent_how[how] += 1
        self.publish(self.up, payload)

    def send_raw(self, payload: bytes, topic: str | None = None) -> None:
        """Publish arbitrary bytes (for bad-input tests)."""
        self.publish(topic or self.up, payload)

    def hello(self, **extra: Any) -> None:
        msg: dict[str, Any] = {"type": "hello", "v": PROTOCOL_VERSION, "dev": self.dev,
                               "agent": "protocol-device/1", "sv": self.sv, "z": self.z}
        if self.caps is not None:
            msg["caps"] = self.caps
            if "zd2" in self.caps and self.zd.zd_id is not None:
                msg["zd"] = self.zd.zd_id
        self.send({**msg, **extra})

    @property
    def agreed(self) -> set[str]:
        """The capabilities the last welcome agreed (§7.11, §11)."""
        with self._cond:
            return set(self.zd.agreed)

    def catchup(self, cp: dict[str, int] | None = None, lim: int | None = None) -> str:
        """Ask for everything after `cp` (default: the checkpoints held); the req id."""
        self._req += 1
        req = f"pd-{self._req}"
        msg: dict[str, Any] = {"type": "catchup", "v": PROTOCOL_VERSION, "dev": self.dev,
                               "req": req, "cp": dict(self.cp if cp is None else cp)}
        if lim is not None:
            msg["lim"] = lim
        if self.snap:
            msg["snap"] = sorted(self.snap)
        self._lim = lim
        with self._cond:
            self._asked[req] = set(msg["cp"])
            self._confirmed[req] = set()
            self._continuing[req] = set()
        self.send(msg)
        return req

    def catchup_answered(self, within: float = 10.0) -> bool:
        """Send a catch-up and say whether a checkpoint answered it within `within` s.
        The server handles a device's messages in order, so an answer means it has
        handled (or, over the device's share, dropped) everything sent before; retried
        by the caller (`fleet.wait(pd.catchup_answered, ...)`), as the intake may drop
        the catch-up itself while the device floods."""
        req = self.catchup()
        try:
            self.wait(lambda: any(c.get("req") == req for c in self.checkpoints), within, req)
        except AssertionError:
            return False
        return True

    def caught_up(self, req: str) -> bool:
        """Every scope of request `req` is in a checkpoint answering it (§9.5)."""
        with self._cond:
            return req in self._asked and self._asked[req] <= self._confirmed[req]

    def sync_from_server(self, timeout: float = 30.0, lim: int | None = None) -> None:
        """Catch up (following `more` pages, `lim` records each) until checkpoints of
        the server have confirmed every scope (§7.8, §9.5)."""
        req = self.catchup(lim=lim)
        self.wait(lambda: self.caught_up(req), timeout, f"checkpoints for {req}")

    def change(self, c: str, k: str, s: str, *, op: str = "put", b: int = 0,
               h: str | None = None, f: dict[str, Any] | None = None,
               i: dict[str, int | float] | None = None, a: dict[str, list[str]] | None = None,
               r: dict[str, dict[str, list[str]]] | None = None) -> dict[str, Any]:
        """A new change with the next gapless n and a fresh stamp (not sent)."""
        ch: dict[str, Any] = {"n": self.next_n, "h": h or self.clock.next(), "c": c, "k": k,
                              "s": s, "b": b, "op": op}
        for name, group in (("f", f), ("i", i), ("a", a), ("r", r)):
            if group:
                ch[name] = group
        self.next_n += 1
        return ch

    def changes_message(self, changes: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"type": "changes", "v": PROTOCOL_VERSION, "dev": self.dev, "sv": self.sv,
                "ch": changes, **extra}

    def send_changes(self, changes: list[dict[str, Any]]) -> None:
        self.send(self.changes_message(changes))

    def tag(self, n: int) -> str:
        """The add-tag of change n of this device (its change id, §5 set)."""
        return f"{self.dev}:{n}"

    # ------------------------------------------------------------------ waiting

    def wait(self, predicate: Callable[[], T | None], timeout: float = 15.0,
             what: str = "condition") -> T:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = predicate()
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{self.dev}: timed out after {timeout} s waiting "
                                         f"for {what}")
                self._cond.wait(min(left, 0.1))

    def wait_acked(self, numbers: Iterable[int], timeout: float = 15.0) -> None:
        wanted = set(numbers)
        self.wait(lambda: wanted <= set(self.acks), timeout, f"acks of {len(wanted)} changes")

    def wait_answered(self, numbers: Iterable[int], timeout: float = 15.0) -> None:
        """Until every n is acked or rejected."""
        wanted = set(numbers)
        self.wait(lambda: wanted <= set(self.acks) | set(self.rejections), timeout,
                  "answers")

    def wait_rejected(self, n: int, timeout: float = 15.0) -> dict[str, Any]:
        rjs: list[dict[str, Any]] = self.wait(lambda: self.rejections.get(n), timeout,
                                              f"a rejection of change {n}")
        return rjs[-1]

    def wait_error(self, code: str, timeout: float = 15.0, after: int = 0) -> dict[str, Any]:
        """A message-level error with `code`, among those received after the first
        `after` errors."""
        def found() -> dict[str, Any] | None:
            for err in self.errors[after:]:
                if err.get("code") == code:
                    return err
            return None
        err: dict[str, Any] = self.wait(found, timeout, f"a message-level {code!r} error")
        return err

    # ------------------------------------------------------------------ receiving

    def _on_connect(self, c: Any, u: Any, flags: Any, reason: Any, props: Any) -> None:
        with self._cond:
            self.connacks.append(str(reason))
            self._cond.notify_all()

    def _on_disconnect(self, c: Any, u: Any, flags: Any, reason: Any, props: Any) -> None:
        with self._cond:
            self.disconnects.append(str(reason))
            self._cond.notify_all()

    def _on_subscribe(self, c: Any, u: Any, mid: int, reasons: list[Any], props: Any) -> None:
        with self._cond:
            self.subscribed = all(not r.is_failure for r in reasons)
            self._cond.notify_all()

    def _on_publish(self, c: Any, u: Any, mid: int, reason: Any, props: Any) -> None:
        with self._cond:
            self._pubacks.add(mid)
            self._cond.notify_all()

    def _on_message(self, c: Any, u: Any, msg: paho.MQTTMessage) -> None:
        try:
            payload, how = self.zd.decode(bytes(msg.payload))
            doc = json.loads(payload)
            if not isinstance(doc, dict) or doc.get("v") != PROTOCOL_VERSION:
                raise ValueError("not a version-1 message")
        except (ValueError, zlib.error):
            with self._cond:
                self.undecodable.append(bytes(msg.payload))
                self._cond.notify_all()
            return
        with self._cond:
            self.received_how[how] += 1
            self.messages.append(doc)
            self._handle(doc)
            self._cond.notify_all()

    def _handle(self, doc: dict[str, Any]) -> None:
        kind = doc.get("type")
        if kind == "welcome":
            self.welcomes.append(doc)
            # §11: a device ignores names it did not offer
            self.zd.agree([c for c in doc.get("caps", []) if c in (self.caps or ())])
        elif kind == "ack":
            for n, s, q in doc.get("ok", []):
                self.acks.setdefault(n, []).append((s, q))
                self._answered(n)
            self.restamped.update(doc.get("rs", []))
            for rec in doc.get("fx", []):
                self._apply(rec)
        elif kind == "reject":
            for rj in doc.get("rj", []):
                self.rejections.setdefault(rj["n"], []).append(rj)
                self._answered(rj["n"])
                if rj.get("rec"):
                    self._apply(rj["rec"])
            if doc.get("err"):
                self.errors.append(doc["err"])
                if doc["err"].get("code") == "dictionary_unknown":
                    # §3 "Recent traffic", §8: forget the references, send what is in
                    # flight again (now with zd2; from a fresh thread, as below)
                    self.zd.dictionary_unknown()
                    again = list(self.unanswered.values())
                    threading.Thread(target=self._send_all, args=(again,), daemon=True).start()
        elif kind == "delta":
            self.deltas.append(doc)
            for rec in doc.get("d", []):
                self._apply(rec)
        elif kind == "page":
            self.pages.append(doc)
            if doc.get("reset"):
                self.snap.add(doc["s"])
            for rec in doc.get("recs", []):
                self._apply(rec)
            self.cp[doc["s"]] = max(self.cp.get(doc["s"], 0), doc["to"])
            continuing = self._continuing.get(doc["req"], set())
            (continuing.add if doc.get("more") else continuing.discard)(doc["s"])
            if doc.get("more"):
                # §9.5: continue this scope from `to` (sent from a fresh thread: we are on
                # paho's network thread and must not wait for a PUBACK here).
                req = doc["req"]
                msg = {"type": "catchup", "v": PROTOCOL_VERSION, "dev": self.dev,
                       "req": req, "cp": {doc["s"]: doc["to"]}}
                if self._lim is not None:
                    msg["lim"] = self._lim
                if doc["s"] in self.snap:
                    msg["snap"] = [doc["s"]]
                threading.Thread(target=self.send, args=(msg,), daemon=True).start()
        elif kind == "checkpoint":
            self.checkpoints.append(doc)
            for s, q in doc.get("cp", {}).items():
                self.cp[s] = max(self.cp.get(s, 0), q)
                self.snap.discard(s)  # §9.5: a checkpoint ends the scope's snapshot
            req = doc["req"]
            if req in self._asked:
                got = set(doc.get("cp", {})) | set(doc.get("denied", []))
                self._confirmed[req] |= got
                self._continuing[req] -= got
                left = self._asked[req] - self._confirmed[req]
                if left and not self._continuing[req]:
                    # Complete beside a scope that said `more`: in no checkpoint yet (§7.8).
                    msg = {"type": "catchup", "v": PROTOCOL_VERSION, "dev": self.dev,
                           "req": req, "cp": {s: self.cp.get(s, 0) for s in sorted(left)}}
                    if self._lim is not None:
                        msg["lim"] = self._lim
                    if self.snap & left:
                        msg["snap"] = sorted(self.snap & left)
                    threading.Thread(target=self.send, args=(msg,), daemon=True).start()

    def _answered(self, n: int) -> None:
        self.zd.answered(n)
        self.unanswered.pop(n, None)

    def _send_all(self, messages: list[dict[str, Any]]) -> None:
        for message in messages:
            self.send(message)

    def _apply(self, rec: dict[str, Any]) -> None:
        """Apply a record state to the base (§6, rules 1-3)."""
        key = (rec["c"], rec["k"])
        q = rec["q"]
        for stamp in (rec.get("h") or {}).values():
            self.clock.observe(stamp)
        cur = self.records.setdefault(key, {"s": rec["s"], "f": {}, "fq": {}, "floor": 0,
                                            "x": False, "xq": 0, "cf": {}})
        for name, value in (rec.get("f") or {}).items():
            if q > cur["fq"].get(name, cur["floor"]):
                cur["f"][name] = value
                cur["fq"][name] = q
                if name in (rec.get("cf") or {}):
                    cur["cf"][name] = rec["cf"][name]
                else:
                    cur["cf"].pop(name, None)
        if not rec.get("part", False):
            for name in [n for n in cur["f"] if n not in (rec.get("f") or {})]:
                if cur["fq"].get(name, cur["floor"]) < q:
                    del cur["f"][name]
                    cur["fq"].pop(name, None)
                    cur["cf"].pop(name, None)
            cur["floor"] = max(cur["floor"], q)
        if q > cur["xq"]:
            cur["x"] = bool(rec.get("x", False))
            cur["xq"] = q


def _encode(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode("utf-8")
