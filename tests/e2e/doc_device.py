"""A device written from docs/PROTOCOL.md and schemas/json/ alone, on plain paho-mqtt.

Deliberately independent of the project's code (no `waystation`, `agent` or `schemas`
import) and of tests/e2e/protocol_device.py: an outside tester's client, so that where
the document is silent or wrong it fails instead of sharing the implementation's
assumptions. It keeps what §6 and §9.4 ask of a device (a base of record states, a
checkpoint per scope advanced only over contiguous sequences) and nothing more: no
outbox, no persistence; a test drives it message by message."""

from __future__ import annotations

import json
import secrets
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

PREFIX = "waystation"
"""§1: the default topic prefix."""


class DocDevice:
    """One device connection (§1): client id = username = device id, persistent session,
    retained `on: false` last will on its status topic, QoS 1 everywhere."""

    def __init__(self, dev: str, password: str, port: int, *,
                 scopes: list[str] | None = None, inc: str | None = None) -> None:
        self.dev = dev
        self.password = password
        self.port = port
        self.scopes = list(scopes or [])
        self.inc = inc or secrets.token_urlsafe(12)  # §2: >= 72 random bits
        self.next_n = 1
        self.last_stamp = (0, 0)
        self.messages: list[dict[str, Any]] = []
        self.cp: dict[str, int] = dict.fromkeys(self.scopes, 0)
        self.seen_q: dict[str, set[int]] = {s: set() for s in self.scopes}
        self.base: dict[tuple[str, str], dict[str, Any]] = {}
        self._cond = threading.Condition()
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._client: mqtt.Client | None = None

    # ------------------------------------------------------------------ transport
    def connect(self, *, online: bool = True, timeout: float = 10.0) -> None:
        """Connect (§1), subscribe to `down`, publish `status` on: true unless told not
        to. A persistent session: a second `connect` resumes the broker's session."""
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.dev,
                             clean_session=False, protocol=mqtt.MQTTv311)
        client.username_pw_set(self.dev, self.password)
        client.will_set(self.topic("status"), self._status_payload(False), qos=1,
                        retain=True)
        client.max_inflight_messages_set(100)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self._connected.clear()
        self._subscribed.clear()
        client.connect("127.0.0.1", self.port, keepalive=30)
        client.loop_start()
        self._client = client
        if not self._connected.wait(timeout):
            raise AssertionError(f"{self.dev}: no CONNACK within {timeout} s")
        if not self._subscribed.wait(timeout):
            raise AssertionError(f"{self.dev}: no SUBACK within {timeout} s")
        if online:
            self.status(True)

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, rc: Any,
                    _p: Any = None) -> None:
        if rc.is_failure:
            raise AssertionError(f"{self.dev}: CONNACK {rc}")
        client.subscribe(self.topic("down"), qos=1)
        self._connected.set()

    def _on_subscribe(self, *_args: Any) -> None:
        self._subscribed.set()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        payload = msg.payload
        if payload[:1] == b"\x78":  # §3: a zlib stream
            payload = zlib.decompress(payload)
        body = json.loads(payload)
        with self._cond:
            self.messages.append(body)
            self._cond.notify_all()

    def close(self, *, clean: bool = True) -> None:
        """Disconnect; `clean`: publish the retained offline status first (§7.10)."""
        if self._client is None:
            return
        if clean:
            self.status(False)
        self._client.disconnect()
        self._client.loop_stop()
        self._client = None

    def topic(self, leaf: str) -> str:
        return f"{PREFIX}/{self.dev}/{leaf}"

    def publish_raw(self, payload: bytes | str, leaf: str = "up", *,
                    retain: bool = False) -> None:
        assert self._client is not None, "not connected"
        info = self._client.publish(self.topic(leaf), payload, qos=1, retain=retain)
        info.wait_for_publish(10)

    def send(self, message: dict[str, Any]) -> None:
        self.publish_raw(json.dumps({"v": 1, **message}, ensure_ascii=False,
                                    separators=(",", ":")).encode())

    def _status_payload(self, on: bool) -> bytes:
        return json.dumps({"type": "status", "v": 1, "dev": self.dev, "on": on,
                           "t": int(time.time() * 1000)}).encode()

    def status(self, on: bool) -> None:
        self.publish_raw(self._status_payload(on), "status", retain=True)

    # ------------------------------------------------------------------ messages
    def hello(self, *, caps: list[str] | None = None, done: list[str] | None = None,
              sv: int = 1) -> None:
        body: dict[str, Any] = {"type": "hello", "dev": self.dev,
                                "agent": "doc-device/1", "sv": sv, "inc": self.inc,
                                "cp": dict(self.cp)}
        if caps is not None:
            body["caps"] = caps
        if done:
            body["done"] = done
        self.send(body)

    def stamp(self) -> str:
        """§4 generating rule; the time part only (16 lowercase hex digits)."""
        w_last, c_last = self.last_stamp
        w = max(w_last, int(time.time() * 1000))
        c = c_last + 1 if w == w_last else 0
        if c > 0xFFFF:
            w, c = w_last + 1, 0
        self.last_stamp = (w, c)
        return f"{w:012x}{c:04x}"

    def change(self, c: str, k: str, s: str, *, op: str = "put",
               **values: Any) -> dict[str, Any]:
        """A new change (§7.2) with the next `n`, a fresh stamp and `b` from §7.2."""
        ch: dict[str, Any] = {"n": self.next_n, "h": self.stamp(), "c": c, "k": k,
                              "s": s, "b": self.cp.get(s, 0), "op": op}
        self.next_n += 1
        ch.update({m: v for m, v in values.items() if v is not None})
        return ch

    def send_changes(self, changes: list[dict[str, Any]]) -> None:
        self.send({"type": "changes", "dev": self.dev, "sv": 1, "inc": self.inc,
                   "ch": changes})

    def catchup(self, req: str, cp: dict[str, int] | None = None, *,
                lim: int | None = None) -> None:
        body: dict[str, Any] = {"type": "catchup", "dev": self.dev, "req": req,
                                "cp": dict(self.cp if cp is None else cp)}
        if lim is not None:
            body["lim"] = lim
        self.send(body)

    # ------------------------------------------------------------------ waiting
    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], *,
                 start: int = 0, timeout: float = 10.0, what: str = "") -> dict[str, Any]:
        """The first message from index `start` on that satisfies `predicate`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for m in self.messages[start:]:
                    if predicate(m):
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{self.dev}: no {what or 'message'} within "
                                         f"{timeout} s; got {self.messages[start:]}")
                self._cond.wait(left)

    def mark(self) -> int:
        """The index of the next message to arrive (for `wait_for(start=...)`)."""
        with self._cond:
            return len(self.messages)

    def of_type(self, kind: str, start: int = 0) -> list[dict[str, Any]]:
        with self._cond:
            return [m for m in self.messages[start:] if m.get("type") == kind]

    def wait_ok(self, n: int, *, start: int = 0, timeout: float = 10.0) -> list[Any]:
        """The `[n, s, q]` entry of the first `ack` naming change `n`."""
        ack = self.wait_for(lambda m: m.get("type") == "ack"
                            and any(e[0] == n for e in m["ok"]),
                            start=start, timeout=timeout, what=f"ack of {n}")
        entry: list[Any] = next(e for e in ack["ok"] if e[0] == n)
        self.apply_states(ack.get("fx", []))
        self.advance(entry[1], entry[2])
        return entry

    def wait_rejection(self, n: int, *, start: int = 0,
                       timeout: float = 10.0) -> dict[str, Any]:
        rj = self.wait_for(lambda m: m.get("type") == "reject"
                           and any(r["n"] == n for r in m.get("rj", [])),
                           start=start, timeout=timeout, what=f"rejection of {n}")
        found: dict[str, Any] = next(r for r in rj["rj"] if r["n"] == n)
        return found

    def wait_err(self, *, start: int, timeout: float = 10.0) -> dict[str, Any]:
        """The `err` of the first message-level `reject` from `start` (§7.5)."""
        m = self.wait_for(lambda m: m.get("type") == "reject" and "err" in m,
                          start=start, timeout=timeout, what="reject with err")
        err: dict[str, Any] = m["err"]
        return err

    # ------------------------------------------------------------------ base (§6, §9.4)
    def apply_states(self, states: list[dict[str, Any]]) -> None:
        """§6 in short: a whole state replaces the record when newer; a part state's
        fields go over it. Enough for the checks these tests make."""
        for st in states:
            key = (st["c"], st["k"])
            held = self.base.get(key)
            if st.get("part"):
                if held is None:
                    held = {"q": 0, "f": {}}
                    self.base[key] = held
                held["f"].update(st.get("f", {}))
                held["q"] = max(held["q"], st["q"])
            elif held is None or st["q"] > held["q"]:
                self.base[key] = {"q": st["q"], "f": dict(st.get("f", {})),
                                  "x": st.get("x", False)}

    def advance(self, scope: str, q: int) -> None:
        """§9.4: the checkpoint moves only over contiguous sequences (never q = 0)."""
        if scope not in self.cp:
            return
        if q:
            self.seen_q[scope].add(q)
        while self.cp[scope] + 1 in self.seen_q[scope]:
            self.cp[scope] += 1

    def gaps(self) -> dict[str, int]:
        """Scopes with a sequence received past a hole: scope -> highest q seen."""
        return {s: max(qs) for s, qs in self.seen_q.items()
                if qs and max(qs) > self.cp[s]}

    def take_deltas(self, start: int) -> list[dict[str, Any]]:
        """Apply every `delta` from index `start` on (§7.6); returns their states."""
        states = [st for m in self.of_type("delta", start) for st in m["d"]]
        self.apply_states(states)
        for st in states:
            self.advance(st["s"], st["q"])
        return states

    def sync(self, req: str, *, lim: int | None = None,
             timeout: float = 10.0) -> list[dict[str, Any]]:
        """A whole catch-up by §9.5: page after page (continuations with `lim` again,
        naming only the scope that said `more`), until a `checkpoint` lists every scope.
        Returns the pages it applied."""
        pages: list[dict[str, Any]] = []
        wanted = set(self.cp)
        done: set[str] = set()
        ask: dict[str, int] = dict(self.cp)
        while True:
            start = self.mark()
            self.catchup(req, ask, lim=lim)
            more: str | None = None
            while True:
                m = self.wait_for(lambda m: m.get("type") in ("page", "checkpoint")
                                  and m.get("req") == req, start=start, timeout=timeout,
                                  what=f"page or checkpoint of {req}")
                start = self.messages.index(m, start) + 1
                if m["type"] == "checkpoint":
                    done |= set(m["cp"]) | set(m.get("denied", []))
                    break
                pages.append(m)
                self.apply_states(m["recs"])
                if m["from"] <= self.cp[m["s"]]:
                    self.cp[m["s"]] = max(self.cp[m["s"]], m["to"])
                    self.seen_q[m["s"]] = {q for q in self.seen_q[m["s"]]
                                           if q > m["to"]}
                    self.advance(m["s"], 0)
                if m["more"]:
                    more = m["s"]
                    break
            if more is not None:
                ask = {more: self.cp[more]}
                continue
            if wanted <= done:
                return pages
            ask = {s: self.cp[s] for s in wanted - done}
