"""The storage side of syncing: what the daemon calls when it sends and receives.

No network code: the MQTT daemon decodes messages into `schemas.wire` models and hands
them here, and publishes what these operations return. Every operation is ONE durable
transaction (data and the checkpoints covering it commit together, §9.4) and idempotent:
applying a message twice has the effect of applying it once (§9.3), so the daemon may
apply whatever the broker delivers, duplicates and reorderings included.

Drain order (§9.2): higher `priority` first, then lower `n`.
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from typing import Any

import orjson

from agent import journal, link_feed, schema_update, scopes, server_feed, txn_sync
from agent.caps import AGENT_CAPS, SCHEMA, SCHEMA_PUSH, ZD2
from agent.connectivity import LinkState, classify
from agent.core import MAX_COMMAND_IDS, Core, Work
from agent.query.maintain import ensure_indexes
from agent.status import record_online
from agent.store import n_key, split_record_key
from agent.sync_receive import AckResult, CheckpointResult, Receiving, RejectResult
from agent.up_packing import UpPacking
from schemas import codec, wire

_ENVELOPE_BYTES = 96
"""Room for the `changes` envelope ({"type","v","dev","sv","ch":[...]}) in a batch."""


class Batch(list[tuple[int, dict[str, Any]]]):
    """The next changes to send: `(n, wire change dict)` in drain order, one schema
    version (`sv`) and one store incarnation (`inc`, None: legacy) for all of them, as a
    `changes` message needs."""

    def __init__(self, items: Iterable[tuple[int, dict[str, Any]]] = (), sv: int = 0,
                 inc: str | None = None) -> None:
        super().__init__(items)
        self.sv = sv
        self.inc = inc
        self.exhausted = False
        """The scan reached the end of the outbox having passed over nothing but the
        excluded changes: until something new is written, a change comes back from
        being excluded, or an answer settles part of a transaction, another
        `next_batch` with the same arguments finds nothing (the daemon then skips
        asking)."""

    @property
    def numbers(self) -> list[int]:
        return [n for n, _ in self]

    def message(self, dev: str) -> wire.Changes:
        """The `changes` message carrying this batch."""
        return wire.Changes(dev=dev, sv=self.sv, inc=self.inc,
                            ch=[wire.Change.model_validate(ch) for _, ch in self])

    def payload(self, dev: str, *, compress_over: int | None = None,
                zdict: bool | bytes = False) -> bytes:
        """The wire bytes of that message, as the daemon publishes them: encoded straight
        from the outbox entries (validated when they were written), without a model."""
        msg: dict[str, Any] = {"type": "changes", "v": 1, "dev": dev, "sv": self.sv,
                               "ch": [ch for _, ch in self]}
        if self.inc is not None:
            msg["inc"] = self.inc
        return codec.encode_dict(msg, compress_over=compress_over, zdict=zdict)


class Sync(Receiving):
    """Daemon-side operations on an open agent store (get it as `Agent.sync`)."""

    def __init__(self, core: Core) -> None:
        self._core = core
        self.dev = core.dev
        self._server_caps: frozenset[str] | None = None
        self.packing = UpPacking()
        """The dictionaries agreed with the server (zd1, zd2, zd3; agent.up_packing)."""
        self.upgrade_needed = False
        """The server's `welcome` said this device's schema version is older than the
        oldest it serves: changes stay in the outbox until the device is upgraded."""

    # ---------------------------------------------------------------- sending


    @property
    def core(self) -> Core:
        """The store and settings this works on (for the daemon's retention and fetch)."""
        return self._core

    def next_batch(self, exclude_n: Iterable[int] = (), max_changes: int = 500,
                   max_bytes: int = 131072, *, txn: bool | None = False,
                   min_priority: int | None = None) -> Batch:
        """The next changes to send, in drain order, skipping `exclude_n` (in flight)
        and, with `min_priority`, every change of a lower priority (the sync policy
        holds those).

        At most `max_changes` changes whose encoded size (with the message envelope)
        stays within `max_bytes`; always at least one if any is waiting. All share the
        schema version and the incarnation of the first. The changes of a transaction
        are never split: all of them (still pending, not in flight) or none are in the
        batch, a transaction over the limits alone in its batch (PROTOCOL.md §7.2.1);
        with `txn` (the server negotiated it) they carry their `tx` marker. `txn=None`
        (not known yet whether the server applies transactions whole: no welcome yet)
        ends the batch before the first transaction, so that nothing overtakes it.
        """
        # Only looked up: a set (or a dict's keys) is used as it is, not copied (the
        # daemon passes up to max_inflight_changes numbers for every batch).
        excluded = exclude_n if isinstance(exclude_n, AbstractSet) else set(exclude_n)

        def run(work: Work) -> Batch:
            batch = Batch()
            size = _ENVELOPE_BYTES
            passed_over = False  # a change not excluded that this batch does not take
            with work.tx.cursor("outbox_idx") as cur:
                found = cur.set_range(b"P")
                while True:
                    if not found:
                        batch.exhausted = not passed_over
                        break
                    key = cur.key()
                    if not key.startswith(b"P"):
                        batch.exhausted = not passed_over
                        break
                    if (min_priority is not None and (2**31 - 1) - int.from_bytes(
                            key[1:5], "big") < min_priority):
                        break  # drain order: every later key has a lower priority
                    n = int.from_bytes(key[-8:], "big")
                    if n in excluded:
                        # Jump over the whole run of excluded numbers at this priority
                        # with one seek: the changes in flight are mostly one run, and
                        # stepping over each of them made every batch cost O(in flight).
                        after = n + 1
                        while after in excluded:
                            after += 1
                        found = cur.set_range(key[:-8] + n_key(after))
                        continue
                    found = cur.next()
                    entry = work.outbox_entry(n)
                    if entry is None:
                        continue
                    if not batch:
                        batch.sv = entry["sv"]
                        batch.inc = entry.get("i")
                    elif entry["sv"] != batch.sv or entry.get("i") != batch.inc:
                        passed_over = True
                        continue
                    if entry.get("x"):  # a transaction: all its pending changes or none
                        if txn is None:
                            break
                        group = txn_sync.members(work, n, entry, excluded)
                        if not group:  # part of it is in flight: not now
                            passed_over = True
                            found = cur.set_range(key[:-8] + n_key(txn_sync.end(entry)))
                            continue
                        cost = txn_sync.cost(group, bool(txn))
                        if batch and (size + cost > max_bytes
                                      or len(batch) + len(group) > max_changes):
                            break
                        batch.extend(txn_sync.wire_changes(group, bool(txn)))
                        size += cost
                        # Its changes are consecutive at this priority: go on after them.
                        found = cur.set_range(key[:-8] + n_key(group[-1][0] + 1))
                    else:
                        cost = len(orjson.dumps(entry["ch"])) + 1
                        if batch and size + cost > max_bytes:
                            break
                        batch.append((n, entry["ch"]))
                        size += cost
                    if len(batch) >= max_changes:
                        break
            return batch

        return self._core.read(run)

    def pending_count(self) -> int:
        return self._core.read(lambda work: work.tx.count("outbox"))

    # --------------------------------------------------------- asking for data

    def catchup_request(self, req_id: str,
                        scopes: Iterable[str] | None = None) -> wire.Catchup:
        """The `catchup` to send (§7.3): every followed scope's checkpoint (or only those
        of `scopes`), the scopes with a snapshot in progress. Remembers `req_id` as the
        latest request."""
        core = self._core
        chosen = None if scopes is None else set(scopes)
        wanted = [s for s in core.scopes if chosen is None or s in chosen]

        def run(work: Work) -> wire.Catchup:
            work.tx.set_meta("creq", req_id)
            cps = {s: work.checkpoint(s) for s in wanted}
            return wire.Catchup(dev=core.dev, req=req_id, cp={s: c.cp for s, c in cps.items()},
                                snap=[s for s, c in cps.items() if c.snapshot],
                                lim=core.settings.catchup_page)

        return core.write(run)

    def gaps_older_than(self, seconds: float) -> bool:
        """True when some scope has had a sequence gap for at least `seconds` (§9.4:
        time to send a `catchup`)."""
        core = self._core

        def run(work: Work) -> bool:
            now = work.now()
            for scope in core.scopes:
                age = work.checkpoint(scope).gap_age_ms(now)
                if age is not None and age >= seconds * 1000:
                    return True
            return False

        return core.read(run)

    def hello(self, agent_version: str, *, z: bool = True) -> wire.Hello:
        """The `hello` to send after every (re)connect (and when the checkpoints moved),
        with executed command ids, the store's incarnation and its checkpoints."""
        core = self._core
        zd = self.packing.hello_zd(core.catalog) if ZD2 in self.offered else None

        def run(work: Work) -> wire.Hello:
            return wire.Hello(dev=self.dev, agent=agent_version, sv=core.catalog.version,
                              zd=zd,
                              z=z, done=list(work.tx.meta("cmds", []))[-MAX_COMMAND_IDS:],
                              inc=work.incarnation(),
                              cp={s: work.checkpoint(s).cp for s in core.scopes},
                              caps=sorted(self.offered))

        return core.read(run)

    @property
    def offered(self) -> frozenset[str]:
        """The features this agent offers in `hello`: all it speaks, but `schema_push`
        only when its configuration takes schema versions from the server."""
        if self._core.settings.schema_push:
            return AGENT_CAPS
        return AGENT_CAPS - {SCHEMA_PUSH}

    def apply_welcome(self, msg: wire.Welcome) -> frozenset[str]:
        """Note the features the server agreed to (only ones this agent offered), and
        with `schema` whether this device is too old for the server (see
        `apply_schema_versions`)."""
        self.server_caps = frozenset(msg.caps) & self.offered
        if SCHEMA in self.server_caps:
            self.apply_schema_versions(msg.sv, msg.sv_min)
        return self.server_caps

    @property
    def server_caps(self) -> frozenset[str] | None:
        """The optional features agreed with the server in its `welcome` to the latest
        `hello` (PROTOCOL.md §11); None until one arrived on this connection."""
        return self._server_caps

    @server_caps.setter
    def server_caps(self, caps: frozenset[str] | None) -> None:
        self._server_caps = caps
        self.packing.welcome(caps)

    def up_packing(self) -> bool | bytes:
        """How up messages other than `changes` are compressed (`zdict` of
        `codec.encode`; agent.up_packing)."""
        return self.packing.packing()

    def changes_payload(self, batch: Batch, compress_over: int | None) -> bytes:
        """The wire bytes of `batch`'s `changes` message, as the daemon publishes them
        (with the device's recent messages as dictionary where `zd3` is agreed)."""
        return self.packing.changes(batch.numbers[0], batch.payload(self.dev), compress_over)

    def apply_schema_versions(self, sv: int | None, sv_min: int | None) -> bool:
        """The server runs schema `sv` and upcasts changes from `sv_min` on. A device
        older than `sv_min` is told to upgrade (meta last_err, shown by `agent status`)
        and holds its changes back; once upgraded, its changes written under a version
        older than `sv_min` are sent as `sv_min` (the oldest the server can read).
        Returns `upgrade_needed`."""
        mine = self._core.catalog.version

        def run(work: Work) -> bool:
            err = work.tx.meta("last_err")
            if sv_min is not None and mine < sv_min:
                work.tx.set_meta("last_err", {
                    "code": "schema_version", "t": work.now(),
                    "reason": f"upgrade needed: this device runs schema version {mine}, the "
                              f"server serves versions {sv_min} to {sv}; install the current "
                              "schema file (schema_file) and restart the agent. Local writes "
                              "are kept and sync after the upgrade"})
                return True
            if err is not None and err.get("code") == "schema_version":
                work.tx.delete("meta", b"last_err")
            # One scan of the outbox per (version, sv_min) seen, not one per reconnect.
            if sv_min is not None and work.tx.meta("sv_floor") != [mine, sv_min]:
                for key, entry in list(work.tx.items("outbox")):
                    if entry["sv"] < sv_min:
                        work.tx.put("outbox", key, {**entry, "sv": sv_min})
                work.tx.set_meta("sv_floor", [mine, sv_min])
            return False

        self.upgrade_needed = self._core.write(run)
        return self.upgrade_needed

    def take_schema(self, msg: wire.SchemaPush) -> schema_update.Taken | None:
        """A `schema` message (§7.13): take the version if the server agreed
        `schema_push` on this connection (None: it did not; the message is ignored),
        then bring the declared indexes in line with it (agent.query)."""
        if self.server_caps is None or SCHEMA_PUSH not in self.server_caps:
            return None
        taken = schema_update.take(self._core, msg)
        if taken.changed:
            ensure_indexes(self._core)
        return taken

    def status_message(self, online: bool, agent_version: str | None = None) -> wire.Status:
        """The retained `status` (§7.10): presence and counts, nothing private."""

        def run(work: Work) -> wire.Status:
            now = work.now()
            first = work.tx.first("outbox")
            return wire.Status(dev=self.dev, on=online, agent=agent_version,
                               sv=self._core.catalog.version, t=now,
                               pend=work.tx.count("outbox"),
                               old=None if first is None else max(0, now - first[1]["t"]),
                               dl=work.tx.count("deadletters"))

        return self._core.read(run)

    # --------------------------------------------------------------- commands

    def command_done(self, command_id: str) -> bool:
        """Whether this store already carried out command `command_id` (§7.9)."""
        return command_id in self._core.read(lambda work: work.tx.meta("cmds", []))

    def execute_command(self, cmd: wire.Command) -> bool:
        """Carry out a `resync`, `scopes`, `sync` or `ping` at most once per id (§7.9);
        False if already done. resync: drop the base and checkpoints, keep the outbox,
        rebuild the views from the pending changes; one ordered by a restore first moves
        the journaled changes the restored server lacks back into the outbox
        (`agent.journal`, §9.7), in the same transaction. scopes: follow the new list
        (`agent.scopes`). sync: record a "sync now" by the operator (the daemon lifts its
        sync policy for a while). ping: nothing. The daemon then sends `hello`. A `wipe`
        replaces the whole store: `Agent.wipe` carries it out.
        """
        if cmd.cmd == "wipe":
            raise ValueError("a wipe replaces the store: carry it out with Agent.wipe")
        core = self._core

        def run(work: Work) -> bool:
            tx = work.tx
            done: list[str] = list(tx.meta("cmds", []))
            if cmd.id in done:
                return False
            if cmd.cmd == "resync":
                restored = journal.parse_seqs(cmd.args)
                if restored is not None:  # ordered by a restore: give back what it lacks
                    journal.replay(work, restored, cmd.id)
                _resync(work)
            elif cmd.cmd == "sync":
                tx.set_meta("sync_now", {"t": work.now(), "by": "operator", "id": cmd.id})
            elif cmd.cmd == "scopes":
                scopes.carry_out(work, cmd.id, cmd.args)
            done.append(cmd.id)
            tx.set_meta("cmds", done[-MAX_COMMAND_IDS:])
            return True

        return core.write(run)

    def last_replay(self) -> dict[str, Any] | None:
        """What the latest resync ordered by a restore gave back (`agent.journal`)."""
        doc: dict[str, Any] | None = self._core.read(
            lambda work: work.tx.meta(journal.REPLAY_KEY))
        return doc

    def sync_now_request(self) -> dict[str, Any] | None:
        """The latest "sync now" ({t, by[, id]}) from the app or the operator."""
        doc: dict[str, Any] | None = self._core.read(lambda work: work.tx.meta("sync_now"))
        return doc

    def record_policy(self, doc: dict[str, Any] | None) -> None:
        """What the sync policy holds back and why (`agent.policy`), for the status;
        None: the daemon stopped, nothing is held by it. A transition of the merge
        server group's up/down state in it is a `server` feed event, in the same
        transaction (`agent.server_feed`)."""

        def run(work: Work) -> None:
            if doc is None:
                work.tx.delete("meta", b"policy")
            else:
                work.tx.set_meta("policy", {**doc, "t": work.now()})
                server_feed.note(work, doc.get("server"))

        self._core.write(run, durable=False)

    def policy_state(self) -> dict[str, Any] | None:
        doc: dict[str, Any] | None = self._core.read(lambda work: work.tx.meta("policy"))
        return doc

    def set_online(self, online: bool) -> None:
        """The daemon's heartbeat: connected or not, now. Call it at least every
        sync.status_interval_s while connected; `status()` reports online only while
        the last heartbeat is fresh and the daemon's process is alive."""
        self._core.write(lambda work: record_online(work, online), durable=False)

    def record_link(self, state: LinkState, reason: str = "",
                    retry_in_s: float | None = None, *, code: str | None = None) -> bool:
        """Record a connectivity change for apps: meta "link" at every change and retry
        (the status's `link`), and in the same transaction a feed event (online, offline,
        retrying) when `agent.link_feed.tell` says so: on a change of state or code, and
        for an unchanged `retrying` at most every `link_feed.RETRY_EVENT_EVERY_S` (one
        event per retry flooded the feed in a long outage). The reason is classified
        (`agent.connectivity`) unless the link already knew its `code` (from the
        exception or the broker's refusal, `waystation.linkproblems`). Returns whether a
        feed event was recorded."""
        if state == "online":
            code = ""
        elif not code:
            code = classify(reason)

        def run(work: Work) -> bool:
            prior = work.tx.meta("link")
            told = link_feed.tell(prior, state, code, work.now())
            if not told and state != "retrying":
                return False  # an unchanged online/offline: nothing new to record
            doc: dict[str, Any] = {"state": state, "code": code, "reason": reason,
                                   "t": work.now()}
            if retry_in_s is not None:
                doc["retry_in_s"] = round(retry_in_s, 1)
            if told:
                work.feed("", "", state,
                          {k: v for k, v in doc.items() if k not in ("state", "t")})
            # Since when the link is (not) online: kept across retries and restarts, so
            # `agent status` says "offline since T", not only when it last tried.
            was_online = prior is not None and prior.get("state") == "online"
            doc["since"] = (work.now() if prior is None or was_online != (state == "online")
                            else prior.get("since", prior.get("t", work.now())))
            doc[link_feed.TOLD_KEY] = link_feed.told_at(prior, told, work.now())
            work.tx.set_meta("link", doc)
            return told

        return self._core.write(run, durable=False)


def _resync(work: Work) -> None:
    tx = work.tx
    for db in ("base", "stamps", "checkpoints", "evicted"):  # evicted: all comes back
        tx.clear(db)
    work.clear_views()
    for key in list(tx.keys("conflicts", b"O")):
        tx.delete("conflicts", key)
    records: dict[bytes, None] = {}
    for key in tx.keys("outbox_idx", b"R"):
        records[key[1:-9]] = None
    for rk in records:
        c, k = split_record_key(rk)
        work.refresh_view(rk, c, k, None)
    tx.delete("meta", b"denied")
    work.feed("", "", "reset")


__all__ = ["AckResult", "Batch", "CheckpointResult", "RejectResult", "Sync"]
