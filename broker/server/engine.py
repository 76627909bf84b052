"""The merge consumer's brain: messages in, messages out, the store in between.

No MQTT here. The daemon feeds the engine what arrives and publishes what it returns:

    engine.handle_many([(topic_device, payload), ...]) -> [(device_id, message_bytes)]
        everything from the `{prefix}/{dev}/up` topics that arrived within a few ms;
        all change batches of the group are applied in ONE store transaction (group
        commit), then each sender gets its `ack` / `reject` / commands / catch-up pages,
        and every other online device of an affected scope one `delta` (set).
    engine.handle_status(topic_device, payload, live=, received_ms=) -> [(device_id, ...)]
        a (retained) `{prefix}/{dev}/status` message: presence, kept in memory; a status
        the server cannot read is answered with a message-level `reject`; a live one
        (not a retained replay) also tells how far the device's clock is off
        (`broker.server.clockskew`).
    engine.tick() -> [(device_id, message_bytes)]
        call about once a second: picks up registry changes made by the CLI (and sends
        newly issued commands to online devices), fans out operator resolutions queued
        in the store, purges old tombstones, flushes presence to the store, and every
        few seconds records that this server is alive (`broker.server.liveness`).
    engine.reset_presence()
        after (re)subscribing to the status topics; the replayed retained statuses
        rebuild presence.
    engine.flush(stopping=True)
        when stopping: writes what waits for the next tick (presence, contact times) and
        that this server stopped cleanly (`broker.server.liveness`).

One thread only: the engine is not thread-safe (the daemon's worker owns it).

Every group is merged, and every catch-up read, under the schema version live when it
commits or reads: a `schema publish` / `rollback` that lands after the engine loaded
its registry makes it reload and run the group (or the read) again
(`broker.server.schema_guard`).

Each returned message goes to `{prefix}/{device_id}/down` (QoS 1). Validation follows
PROTOCOL.md §10.1; every refusal is answered where the device can be told and kept as a
dead letter with the raw payload. Nothing raises out of the engine for bad input: an
unexpected failure while handling one message becomes a dead letter and a transient
`server_error` for that message, and the rest of the group goes on.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any, TypeVar

import structlog

from broker.errors import StoreError
from broker.server import schema_guard
from broker.server.answers import message_replies
from broker.server.applier import Applier
from broker.server.caps import ZDICT, served_now
from broker.server.clockskew import ClockWatch, Sample
from broker.server.downcast import Downcaster
from broker.server.engine_letters import TRIM_INTERVAL_MS, DeadLetterQueue
from broker.server.engine_missed import MissedNudges
from broker.server.engine_txn import MAX_PENDING_LETTERS, GroupTransaction
from broker.server.expiry import Expiry
from broker.server.fanout import Fanout, Outgoing
from broker.server.fetch_query import QueryLimits, ScanAllowance
from broker.server.incoming import Incoming, parse_up
from broker.server.letter_gate import GateLimits, LetterGate
from broker.server.liveness import Heartbeat
from broker.server.messages import (
    Compression,
    Packing,
    command_message,
    compress,
    error_message,
)
from broker.server.missed import MissedDeltas
from broker.server.operations import purge_tombstones
from broker.server.pending_rows import PendingRows
from broker.server.periodic import drain_notices, unsent_commands
from broker.server.presence import (
    MAX_STATUS_BYTES,
    Presence,
    PresenceLog,
    parse_status,
    status_time,
)
from broker.server.recent import recent_traffic
from broker.server.registry import Registry
from broker.server.schema_push import LiveSchema
from broker.server.store.base import (
    DeadLetter,
    DeadLetterStats,
    ServerRow,
    Store,
    WriteTxn,
)
from schemas import codec
from schemas.collection import Catalog
from schemas.errors import ProtocolError
from schemas.wire import ID_PATTERN
from waystation import __version__
from waystation.config import ServerConfig
from waystation.hlc import SERVER_NODE, Clock
from waystation.processes import this_process
from waystation.rules import Rule, load_rules

log = structlog.get_logger(__name__)

_ID_RE = re.compile(ID_PATTERN)
_T = TypeVar("_T")
_READS = ("catchup", "fetch", "fetchq")
"""Up messages answered by reading the store (`broker.server.catchup.answer_all`)."""
PURGE_INTERVAL_MS = 60_000
"""How often tombstones older than the retention are purged, at most (more often when
the retention itself is short, so a tombstone never outlives it by much)."""

SERVER_NAME = f"waystation-server/{__version__}"
"""What `welcome.srv` says this server is."""


class Engine(DeadLetterQueue, MissedNudges, GroupTransaction):
    """Validates, applies and answers device messages (see module docstring)."""

    def __init__(self, store: Store, catalog: Catalog, config: ServerConfig,
                 now_ms: Callable[[], int], clock: Clock | None = None, *,
                 rules: Sequence[Rule] | None = None) -> None:
        self.store = store
        self.catalog = catalog
        self.config = config
        self.cfg = config.merge
        self.now_ms = now_ms
        self.clock = clock if clock is not None else Clock(SERVER_NODE, now_ms)
        self.rules = list(load_rules(self.cfg.rules) if rules is None else rules)
        self.applier = Applier(catalog, self.cfg, self.clock, now_ms, self.rules)
        self.schema = LiveSchema(catalog)  # loaded with the registry, below
        self.scan_allowance = ScanAllowance(
            self.cfg.fetch_query_scan_rate, 4 * self.cfg.fetch_query_scan_budget, now_ms)
        self.downcaster: Downcaster | None = None
        self._schema_out: list[Outgoing] = []
        ret = config.retention
        self.expiry = Expiry(catalog, ret.collections, ret.batch, ret.interval_s * 1000)
        self.registry = Registry()
        self.presence = Presence()
        self.presence_log = PresenceLog()
        """Presence changes for the log, one event per device per second at most."""
        self.missed = MissedDeltas(self.cfg.missed_grace_ms)
        """Deltas skipped for devices counted offline (`broker.server.missed`)."""
        self._disabled: set[str] = set()
        self._out_since = 0
        """`missed.count` before the messages last returned were made."""
        self.clocks = ClockWatch(self.cfg.max_skew_ms)
        """How far each device's clock is off, from its live statuses."""
        self.counters: Counter[str] = Counter()
        self.recent = recent_traffic(config)
        """The references of devices that agreed to `zd3` (None: not served here)."""
        self._sent_commands: set[str] = set()
        self._schema_owed: set[str] = set()
        """Devices a message could not reach: their `schema` push is offered again."""
        self._rows = PendingRows()
        """Presence and contact times waiting to be written (`broker.server.pending_rows`)."""
        self._letters: list[DeadLetter] = []
        self._unresolved_status: dict[str, bytes] = {}
        """Statuses of devices unknown when the registry could not be read (retried)."""
        dl = config.dead_letters
        self.gate = LetterGate(GateLimits(keep_first=dl.keep_first, window_ms=dl.window_s * 1000,
                                          raw_bytes=dl.raw_bytes))
        self.dead_letter_stats: DeadLetterStats | None = None
        """The store's dead-letter figures, read at each trim (for metrics)."""
        self._next_purge = 0
        self._next_trim = 0
        self.heartbeat = Heartbeat(config.server_id, config.server_group, __version__,
                                   now_ms(), proc=this_process())
        """This server's liveness row (`broker.server.liveness`), written by the tick."""
        self._refresh_registry()
        self._commands_gen = -1  # push pending commands to online devices at the first tick
        # Start from the presence last recorded; the retained statuses the broker replays
        # when the server subscribes correct it. Starting with everyone offline would lose
        # the deltas of changes the broker kept for this server's session while it was
        # down: they arrive before that replay, and devices that stayed online would
        # learn of them only at their next gap or reconnect.
        for row in self.registry.devices():
            if row.online:
                self.presence.set(row.id, True)
            else:  # (a disabled one is counted away by the registry load above)
                self.missed.offline(row.id)
        # Recorded now, not at the first tick: a server that dies within its first
        # second must not leave the previous run's "stopped cleanly" standing.
        self._beat(self.heartbeat.row.started_ms)

    # ------------------------------------------------------------------ public API

    def handle_up(self, topic_device: str, payload: bytes) -> list[Outgoing]:
        """Handle one message from `{prefix}/{topic_device}/up`."""
        return self.handle_many([(topic_device, payload)])

    def handle_many(self, items: Iterable[tuple[str, bytes]]) -> list[Outgoing]:
        """Handle a group of up messages with one store transaction (group commit)."""
        now = self.now_ms()
        self._out_since = self.missed.count
        # No registry read here: the group's transaction checks the generation and
        # reloads (and parses again) when it moved (`broker.server.engine_txn`).
        served = self._served()
        incs = [parse_up(dev, payload, self.registry, self.cfg, self.recent, served)
                for dev, payload in items]
        self._commit(incs, now)
        out: list[Outgoing] = []
        fan = Fanout(self.registry, self.presence)
        catchups: list[Incoming] = []
        for inc in incs:
            self._note_missed(inc)
            if inc.kind in _READS and not inc.failed and not inc.blocked:
                catchups.append(inc)
                continue
            try:
                out.extend(self._replies(inc, fan))
            except Exception:  # pragma: no cover - defensive: replies are pure
                log.exception("reply_failed", dev=inc.topic_dev)
        out.extend(fan.messages(self._compress_over))
        # Projected now, with the schema the group was merged under: answering the
        # catch-ups may reload a newer one.
        out = self._downcast(out)
        if catchups:
            out.extend(self._catchups(catchups))
        return out

    def handle_status(self, topic_device: str, payload: bytes, *, live: bool = False,
                      received_ms: int | None = None) -> list[Outgoing]:
        """Record a device's presence from its (retained) status message; `live` (not a
        retained replay), received at `received_ms` (default: now), its `t` also tells
        how far the device's clock is off (`broker.server.clockskew`).

        A status the server cannot read leaves presence as it was, is kept as a dead
        letter and, for a registered device, answered with a `reject` whose `err` says
        why (PROTOCOL.md §7.10): otherwise the device would never learn why it gets no
        deltas.
        """
        try:
            report = parse_status(topic_device, payload)
        except ProtocolError as err:
            return self._bad_status(topic_device, err.code, err.reason, payload)
        except Exception:  # pragma: no cover - parse_status raises ProtocolError only
            log.exception("status_failed", dev=topic_device)
            return self._bad_status(topic_device, codec.SERVER_ERROR,
                                    "the server failed to read this status", payload)
        if self.registry.get(topic_device) is None:
            # Enrolled since the last refresh (`device add` runs in another process)? A
            # new device's first status must count: until it does, the device is
            # "offline" and the changes in its scopes never reach it as deltas.
            try:
                self._refresh_registry()
            except StoreError:
                # Cannot tell whether it is enrolled: keep the status for the next tick
                # rather than drop a new device's only (retained) status.
                log.exception("registry_refresh_failed", dev=topic_device)
                self._unresolved_status[topic_device] = payload
                return []
        if self.registry.get(topic_device) is None:
            self._queue_letter(topic_device, "status", codec.UNKNOWN_DEVICE,
                               f"status of unregistered device {topic_device!r} ignored",
                               payload)
            return []
        if self.presence.set(topic_device, report.on):
            self.presence_log.changed(topic_device, report.on, self.now_ms())
            if report.on:
                if self.registry.active(topic_device) is not None:  # disabled: at enable
                    self.missed.online(topic_device, self.now_ms())
            else:
                self.missed.offline(topic_device)
        fields: dict[str, Any] = {"online": report.on}
        row = self.registry.get(topic_device)
        if report.pend >= 0 and row is not None:
            # A status without a count (the last will of a device that dropped) keeps the
            # count last reported, and when: "5, as of 2 h ago" says more than "-".
            reported_ms = status_time(report.t, self.now_ms(), row.created_ms,
                                      self.cfg.max_skew_ms)
            fields.update(pend=report.pend, pend_ms=reported_ms,
                          pend_old_ms=0 if not report.pend or report.old is None
                          else max(0, reported_ms - report.old))
            if report.dl is not None:
                fields["dl"] = report.dl
            # The device's own report is a contact too: an idle device that is online
            # must not show "last seen 3 h ago" (its last change). Never backwards.
            if reported_ms > row.last_seen_ms:
                fields["last_seen_ms"] = reported_ms
        if live and report.t is not None and row is not None:
            arrived_ms = self.now_ms() if received_ms is None else received_ms
            offset = self.clocks.observe(topic_device, Sample(report.t, arrived_ms), row.clk)
            if offset is not None:
                fields.update(clk=offset, clk_ms=arrived_ms)
        self._rows.put(topic_device, fields)
        return []

    def _bad_status(self, dev: str, code: str, reason: str, payload: bytes,
                    size: int | None = None) -> list[Outgoing]:
        self._queue_letter(dev, "status", code, reason, payload, size=size)
        # Not to unregistered devices: the broker replays the retained status of every
        # removed device to each server that subscribes, and those have no one to tell.
        if self.registry.get(dev) is None:
            return []
        return [(dev, error_message(code, f"status message: {reason}"))]

    def handle_refused(self, topic_device: str, topic: str, head: bytes,
                       size: int) -> list[Outgoing]:
        """A payload of `size` bytes that the intake refused as over max_payload_bytes
        without queuing it (only its first bytes, `head`, are here): a `too_large` dead
        letter, and the device told when it came on its up topic or, registered, on its
        status topic (§7.10: a status it cannot read is answered like any other)."""
        limit = f"exceeds the limit of {self.cfg.max_payload_bytes} bytes"
        if topic == "status":
            reason = (f"payload of {size} bytes {limit} (a status is read up to "
                      f"{MAX_STATUS_BYTES} bytes); publish a status of the members of §7.10")
            return self._bad_status(topic_device, codec.TOO_LARGE, reason, head, size=size)
        reason = f"payload of {size} bytes {limit} (merge.max_payload_bytes); split the batch"
        self._queue_letter(topic_device, topic, codec.TOO_LARGE, reason, head, size=size)
        if topic != "up" or not _ID_RE.fullmatch(topic_device):
            return []
        return [(topic_device, compress(error_message(codec.TOO_LARGE, reason),
                                        self._compress_over(topic_device)))]

    def tick(self) -> list[Outgoing]:
        """Periodic work (see module docstring); never raises."""
        out: list[Outgoing] = []
        now = self.now_ms()
        self._out_since = self.missed.count
        try:
            self._letters.extend(self.gate.due(now)[:max(0, MAX_PENDING_LETTERS
                                                          - len(self._letters))])
            if now >= self._next_trim:
                self._next_trim = now + TRIM_INTERVAL_MS
                self._trim_letters(now)
            self.presence_log.flush(now)
            self.clocks.log.flush(now)
            self._refresh_registry()
            unresolved, self._unresolved_status = self._unresolved_status, {}
            for dev, payload in unresolved.items():
                out.extend(self.handle_status(dev, payload))
            if self.registry.generation != self._commands_gen:
                self._commands_gen = self.registry.generation
                self.clocks.forget({row.id for row in self.registry.devices()})
                out.extend(self._push_commands())
            out.extend(self._schema_out)
            self._schema_out = []
            if expired := self.expiry.tick(self.store, self.clock, now):
                log.info("records_expired", count=expired)
            out.extend(self._drain_notices())
            out.extend(self._nudges(now))
            if now >= self._next_purge:
                retention_ms = self.cfg.tombstone_retention_s * 1000
                self._next_purge = now + max(1000, min(PURGE_INTERVAL_MS, retention_ms // 2))
                purged = purge_tombstones(self.store, now, self.cfg.tombstone_retention_s * 1000)
                if purged:
                    log.info("tombstones_purged", count=purged)
            # The liveness row goes with the waiting rows: one transaction per tick.
            beat = self.heartbeat.due(now)
            if self._rows or self._letters or beat is not None:
                self._commit([], now, beat)
                # Refused with the waiting rows: the liveness row alone (it may pass, and
                # it says the store refuses writes).
                self._beat(now)
            out = self._downcast(out)
        except Exception:
            log.exception("tick_failed")
            # Still alive and merging: say so even when other periodic work failed (a
            # store that cannot be written fails this too, and the server shows as gone).
            self._beat(now)
        return out

    def _beat(self, now: int) -> None:
        beat = self.heartbeat.due(now)
        if beat is None:
            return
        try:
            self.store.transact(partial(_put_server, row=beat, heartbeat=self.heartbeat))
            self.heartbeat.written(beat)
        except Exception as exc:
            if self.heartbeat.store_failing_ms:
                # (each refusal is logged already, as store_failed: not twice a second)
                log.debug("liveness_write_failed", error=str(exc))
            else:
                log.exception("liveness_write_failed")

    def flush(self, *, stopping: bool = False) -> None:
        """Write what waits for the next tick (presence, contact times, dead letters);
        `stopping`: and that this server stopped cleanly (the daemon's last call).
        Never raises."""
        now = self.now_ms()
        try:
            self._commit([], now, self.heartbeat.stopping(now) if stopping else None)
        except Exception:  # pragma: no cover - _commit logs and keeps what failed
            log.exception("flush_failed")

    def _served(self) -> frozenset[str]:
        """What a hello may agree to now (`broker.server.caps.served_now`)."""
        return served_now(recent_kept=self.recent is not None,
                          other_servers=self.heartbeat.others)

    def is_online(self, dev: str) -> bool:
        return self.presence.is_online(dev)

    def reset_presence(self) -> None:
        """Call after (re)subscribing to the status topics: everyone is offline until the
        broker's replayed retained statuses say otherwise."""
        for dev in self.presence.reset():
            self._rows.put(dev, {"online": False})
        # (not counted away by `self.missed`: a device online through the server's
        # reconnect missed only what the link refused, which `undelivered` noted)

    # ------------------------------------------------------------------ replies

    def _downcast(self, out: list[Outgoing]) -> list[Outgoing]:
        """Records projected down for devices on an older published schema version."""
        if self.downcaster is None or not out:
            return out
        return self.downcaster.apply(out, self._device_sv, self._compress_over)

    def _device_sv(self, dev: str) -> int | None:
        row = self.registry.get(dev)
        return row.sv if row is not None and row.sv else None

    def _compress_over(self, dev: str) -> Compression:
        row = self.registry.get(dev)
        if row is None:
            return None
        over = self.cfg.compress_over_bytes if row.z else None
        return Packing(over, zdict=True) if ZDICT in row.caps else over

    def _replies(self, inc: Incoming, fan: Fanout) -> list[Outgoing]:
        dev = inc.topic_dev
        if not _ID_RE.fullmatch(dev):
            return []  # no down topic to answer on
        msgs = message_replies(inc, fan, lambda caps, sv: self.schema.welcome(
            caps, SERVER_NAME, sv), blocked_reads=_READS)
        if inc.kind == "hello" and not (inc.error is not None or inc.failed):
            self._sent_commands.update(c.id for c in inc.commands)
        over = self._compress_over(dev)
        return [(dev, compress(m, over)) for m in msgs]

    def _catchups(self, incs: list[Incoming]) -> list[Outgoing]:
        reqs = [(inc.device, inc.msg) for inc in incs if inc.device is not None]
        out, records = schema_guard.answer_live(
            self.store, reqs, self._compress_over, lambda: self.registry.generation,
            self._refresh_registry, self.counters, lambda: self.catalog,
            QueryLimits(self.cfg.fetch_query_max_records, self.cfg.fetch_query_scan_budget),
            self.scan_allowance)
        out = self._downcast(out)
        self.counters["catchup_records"] += records
        now = self.now_ms()
        for device, _ in reqs:
            self._rows.put(device.id, {"synced_ms": now})
        return out

    # ------------------------------------------------------------------ periodic work

    def _refresh_registry(self) -> bool:
        """Reload the registry if it changed, and the schema history with it (`schema
        publish` / `rollback` bump the generation): a new version is run at once and
        sent to the online devices that take it (`broker.server.schema_push`)."""
        with self.store.read() as txn:
            moved = self.registry.refresh(txn)
            if moved:
                self._note_enabled(self.now_ms())
            if not (moved and self.schema.refresh(txn)):
                return moved
        self.catalog = self.applier.catalog = self.schema.catalog
        self.applier.chain = self.schema.chain
        self.applier.withdrawn = self.schema.withdrawn
        self.downcaster = self.schema.downcaster
        self._schema_out = self.schema.pushes(self.registry.devices(), self.presence.online())
        return moved

    def _push_commands(self) -> list[Outgoing]:
        cmds = unsent_commands(self.store, self.registry, self.presence, self._sent_commands)
        return [(c.device, compress(command_message(c.id, c.cmd, c.args),
                                    self._compress_over(c.device))) for c in cmds]

    def _drain_notices(self) -> list[Outgoing]:
        fan = Fanout(self.registry, self.presence)
        if not drain_notices(self.store, fan, generation=self.registry.generation,
                             applied=self.missed.applied):
            return []
        return fan.messages(self._compress_over)

def _put_server(txn: WriteTxn, row: ServerRow, heartbeat: Heartbeat) -> None:
    txn.put_server(row)
    heartbeat.saw(txn.servers(), row.seen_ms)


__all__ = ["Engine", "Outgoing"]
