"""The agent daemon's receiver: what each message on the down topic does (PROTOCOL.md
§7.4 to §7.9, §9): acks and rejections settle the changes in flight, deltas, pages and
checkpoints go to the store through `agent.sync` and drive the catch-up, commands are
carried out and answered with a hello.

A mixin of `agent.daemon.AgentDaemon`, kept apart so the daemon's sender and loop stay
readable; it runs on the daemon's engine thread like everything else there.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import structlog

from agent.api import Agent
from agent.catchup import CatchupRound
from agent.clientcert import ClientCerts
from agent.creds import BadCreds, BrokerCredentials
from agent.creds import parse as parse_creds
from agent.retry_backoff import retry_delay
from agent.sync import Sync
from schemas import codec, wire
from schemas.errors import ProtocolError
from waystation import __version__
from waystation.config import AgentConfig
from waystation.mqtt import MqttLink

log = structlog.get_logger("waystation.agent")
_ANSWERS = (wire.Reject, wire.Page, wire.Checkpoint)
"""Answers (besides acks) to what this device sent: the server is reading it."""

AGENT_NAME = f"waystation/{__version__}"
RELOGIN_FIRST_S = 2.0
RELOGIN_MAX_S = 600.0


class ReceiveHooks:
    """Needs the daemon's state (`sync`, `agent`, `stats`, the in-flight and retry
    tables, the catch-up under way) and its sending methods."""

    cfg: AgentConfig
    dev: str
    agent: Agent
    sync: Sync
    stats: Any
    _inflight: dict[int, float]
    _first_sent: dict[int, float]
    _retry_at: dict[int, float]
    _catchup: CatchupRound | None
    _catchup_sent: float
    _answered: bool
    _send: Callable[[wire.Message], bool]
    _start_catchup: Callable[[], None]
    _hello_if_moved: Callable[[], None]
    _take_sync_now: Callable[[], None]
    _policy_doc: dict[str, Any] | None
    _note_rtt: Callable[[float], None]
    _rng: random.Random
    creds: BrokerCredentials
    certs: ClientCerts
    _cert_command: Callable[[wire.Command], bool]
    _on_cert: Callable[[wire.CertIssued], None]
    link: MqttLink
    _connected: bool
    _may_send: bool
    _relogin_at: float = 0.0  # a pending password at start: try it at the first turn
    _behind_at: dict[str, int] | None = None
    """Where the scopes a `checkpoint` found behind stood (None: the last was not)."""
    _behind_wait_until: float = 0.0
    """No catch-up for a gap before this (monotonic): the last answer changed nothing."""
    _relogin_wait: float = RELOGIN_FIRST_S

    def _relogin_soon(self) -> None:
        """Log in with the new password at the next timer turn."""
        self._relogin_wait = RELOGIN_FIRST_S
        self._relogin_at = time.monotonic()

    def _creds_timer(self, now: float) -> None:
        """While a new password is held but this connection logged in with an older one
        (Mosquitto until the server switched its password file), log in again now and
        then, backing off: each try costs at most one refused CONNECT and a reconnect."""
        pending = self.creds.pending_rotation
        if pending is None or not self._connected or now < self._relogin_at:
            return
        self._relogin_at = now + self._relogin_wait
        self._relogin_wait = min(RELOGIN_MAX_S, self._relogin_wait * 2)
        log.info("broker_relogin", dev=self.dev, rotation=pending)
        self.link.relogin()

    def _hello_msg(self) -> wire.Hello:
        """`hello`, naming the credential rotation this connection logged in with."""
        hello = self.sync.hello(AGENT_NAME, z=True)
        rotation = self.creds.login_rotation
        update: dict[str, Any] = {} if rotation is None else {"cred": rotation}
        renewal, exp = self.certs.login_renewal, self.certs.login_expires_ms()
        if renewal is not None:
            update["crt"] = renewal
        if exp is not None and 0 <= exp < 2**53:
            update["cexp"] = exp
        return hello.model_copy(update=update) if update else hello
    _on_fetched: Callable[[wire.Fetched], None]
    _on_fetched_query: Callable[[wire.FetchedQuery], None]

    def _on_message(self, payload: bytes) -> None:
        try:
            msg = codec.decode(payload, allowed=wire.DOWN_TYPES)
        except ProtocolError as err:
            self.stats.bad_messages += 1
            log.warning("bad_down_message", dev=self.dev, code=err.code, reason=err.reason)
            return
        if isinstance(msg, wire.Ack):  # the usual message: first, with the fewest tests
            self._answered = True
            result = self.sync.apply_ack(msg)
            self.sync.packing.answered(ok[0] for ok in msg.ok)
            if result.applied and result.applied[0] in self._inflight:
                self._note_rtt(self._first_sent.get(result.applied[0],
                                                    self._inflight[result.applied[0]]))
            for n in (*result.applied, *result.ignored):
                self._inflight.pop(n, None)
                self._first_sent.pop(n, None)
                self._retry_at.pop(n, None)
            self.stats.acked += len(result.applied)
            return
        if isinstance(msg, _ANSWERS):
            self._answered = True
        self._may_send = True  # a rejection, a welcome... may free changes to send
        if isinstance(msg, wire.Reject):
            self._on_reject(msg)
        elif isinstance(msg, wire.Delta):
            self.sync.apply_delta(msg)
            self.stats.deltas += 1
        elif isinstance(msg, wire.Page):
            self._on_page(msg)
        elif isinstance(msg, wire.Checkpoint):
            self._on_checkpoint(msg)
        elif isinstance(msg, wire.Command):
            self._on_command(msg)
        elif isinstance(msg, wire.Fetched):
            self._on_fetched(msg)
        elif isinstance(msg, wire.FetchedQuery):
            self._on_fetched_query(msg)
        elif isinstance(msg, wire.Welcome):
            caps = self.sync.apply_welcome(msg)
            log.info("welcome", dev=self.dev, server=msg.srv, caps=sorted(caps))
        elif isinstance(msg, wire.SchemaPush):
            self._on_schema(msg)
        elif isinstance(msg, wire.CertIssued):
            self._on_cert(msg)

    def _on_schema(self, msg: wire.SchemaPush) -> None:
        """Take the schema version the server sends (agent.schema_update); once taken,
        `hello` says the new `sv` so the server stops projecting records down."""
        taken = self.sync.take_schema(msg)
        if taken is None:
            log.warning("schema_not_agreed", dev=self.dev, sv=msg.sv)
        elif taken.changed:
            self._send(self._hello_msg())

    def _on_reject(self, msg: wire.Reject) -> None:
        # One try counted and one backoff drawn per change refused for now, before the
        # store write: the last error it records says when the next try is (`agent
        # status`), the same time the daemon then keeps to.
        tries = {rj.n: self.stats.extra.get(f"try:{rj.n}", 0) + 1
                 for rj in msg.rj if not rj.perm}
        cfg = self.cfg.sync
        delays = {n: retry_delay(t, cfg.backoff_initial_s, cfg.backoff_max_s, self._rng.random())
                  for n, t in tries.items()}
        result = self.sync.apply_reject(msg, delays)
        self.sync.packing.answered(rj.n for rj in msg.rj)
        for n in (*result.dead, *result.ignored):
            self._inflight.pop(n, None)
            self._retry_at.pop(n, None)
        self.stats.dead += len(result.dead)
        if result.transient:
            codes = {rj.n: rj.code for rj in msg.rj}
            now = time.monotonic()
            # Every transient one is in `tries`: the store adds only permanent rejections
            # (the rest of a refused transaction, agent.txn_sync.with_transactions).
            for n in result.transient:
                self._inflight.pop(n, None)
                self.stats.extra[f"try:{n}"] = tries[n]
                self._retry_at[n] = now + delays[n]
                log.info("change_deferred", dev=self.dev, n=n, code=codes[n],
                         retry_in_s=round(delays[n], 1))
        if result.dead:
            log.warning("changes_rejected", dev=self.dev, numbers=result.dead,
                        reasons=sorted({rj.code for rj in msg.rj if rj.perm}))
        if result.error:
            code = result.error.get("code")
            if code == codec.DICTIONARY_UNKNOWN:
                # Expected after a server restart: no warning, nothing lost. The server
                # lost this device's recent messages: what is in flight goes again at
                # once, with zd2, and the references start anew.
                if self.sync.packing.dictionary_unknown():
                    log.info("zd3_references_reset", dev=self.dev)
                    self._resend_inflight()
                return
            log.warning("message_rejected", dev=self.dev, **result.error)
            if code == codec.MALFORMED and self.sync.packing.malformed():
                # The server took zd2 but cannot read it (its schemas changed under the
                # connection): the changes time out and go again with the zd1 dictionary.
                log.warning("zd2_dropped", dev=self.dev)

    def _resend_inflight(self) -> None:
        """Send everything in flight again at the next turn (the server could not read
        one of the messages, and does not say which changes it held)."""
        self.stats.resent += len(self._inflight)
        self._inflight.clear()
        self._may_send = True

    def _on_page(self, page: wire.Page) -> None:
        self.sync.apply_page(page)
        self.stats.pages += 1
        if self._catchup is not None and page.req == self._catchup.req:
            self._catchup.on_page(page.s, page.more)
        if page.more:
            # Continue only this scope: asking again for every scope would make the
            # server answer each scope once per request, multiplying the pages.
            cps = self.agent.checkpoints()
            cp = cps.get(page.s)
            snap = [page.s] if cp is not None and cp.snapshot else []
            req = self._catchup.req if self._catchup is not None else page.req
            self._send(wire.Catchup(dev=self.dev, req=req, cp={page.s: page.to}, snap=snap,
                                    lim=self.cfg.sync.catchup_page))
            self._catchup_sent = time.monotonic()
        elif page.reset and self._catchup is None:
            self._start_catchup()  # a late copy restarted a snapshot: only a checkpoint ends it

    def _on_checkpoint(self, msg: wire.Checkpoint) -> None:
        result = self.sync.apply_checkpoint(msg)
        if result.behind:
            cps = self.agent.checkpoints()
            stand = {s: cps[s].cp for s in result.behind if s in cps}
            if stand == self._behind_at:
                # Behind again and not one of those checkpoints moved: the same request
                # gets the same answer (a server before PROTOCOL.md §7.7's page without
                # records leaves a device at 0 of a scope with none left behind for ever,
                # and it asked ~100 times a second). Ask again at the gap timer's pace.
                self._catchup = None
                self._behind_wait_until = time.monotonic() + self.cfg.sync.gap_timeout_s
                log.info("catchup_behind", dev=self.dev, scopes=result.behind,
                         retry_in_s=self.cfg.sync.gap_timeout_s)
                return
            self._behind_at = stand  # once at once: e.g. a page lost in a reconnect
            log.info("catchup_behind", dev=self.dev, scopes=result.behind)
            self._start_catchup()
            return
        self._behind_at = None
        self._hello_if_moved()
        current = self._catchup
        if current is not None and msg.req == current.req:
            # Scopes complete in an answer where another said `more` are in no checkpoint
            # of the chain (PROTOCOL.md §7.8): ask for them again once the chain is done.
            again = current.after_checkpoint(msg.cp, msg.denied)
            if current.done:
                self._catchup = None
            elif again:
                self._catchup_sent = time.monotonic()
                self._send(self.sync.catchup_request(current.req, scopes=again))
        if result.dropped:
            log.info("snapshot_dropped_records", dev=self.dev, count=result.dropped)
        if result.denied:
            log.warning("scopes_denied", dev=self.dev, scopes=result.denied)

    def _take_creds(self, cmd: wire.Command) -> bool:
        """Store the new broker password of a `creds` command before it counts as done
        (`agent.creds`); False when refused: not reported done, the old password stays."""
        if self.sync.command_done(cmd.id):
            return True
        try:
            self.creds.offer(parse_creds(cmd.args, self.dev))
        except BadCreds as exc:
            log.warning("bad_creds_command", dev=self.dev, id=cmd.id, reason=str(exc))
            return False
        except OSError as exc:
            log.error("broker_password_not_saved", dev=self.dev, id=cmd.id,
                      path=str(self.creds.path), error=str(exc),
                      hint="the old password stays in use; make the data_dir writable, "
                           "the server sends the password again at the next connection")
            return False
        return True

    def _on_command(self, cmd: wire.Command) -> None:
        if cmd.cmd == "creds" and not self._take_creds(cmd):
            # No hello either: the server would send the same command straight back.
            return
        if cmd.cmd == "cert_renew" and not self._cert_command(cmd):
            return  # reported done once the certificate is stored (agent.daemon_cert)
        if cmd.cmd == "wipe":
            executed = not self.sync.command_done(cmd.id)
            if executed:
                report = self.agent.wipe(cmd.id)
                self.sync = self.agent.sync
                # The new store has no heartbeat yet: without one `agent status` says
                # "offline" until the next status interval, though the link is up.
                self.sync.set_online(True)
                # Nor the policy state (deferrals, the server group's up/down): recorded
                # only when it changes, it would stay missing from `agent status` (server
                # null, nothing held) until something changed.
                self._policy_doc = None
                log.warning("wiped", dev=self.dev, id=cmd.id,
                            key_destroyed=report.key_destroyed, key_kept=report.key_kept)
        else:
            executed = self.sync.execute_command(cmd)
        log.warning("command", dev=self.dev, id=cmd.id, cmd=cmd.cmd, executed=executed)
        done = self.sync.last_replay() if executed and cmd.cmd == "resync" else None
        if done is not None and done.get("id") == cmd.id:
            log.warning("replayed_after_restore", dev=self.dev, id=cmd.id,
                        changes=done.get("changes", 0), scopes=done.get("scopes", {}),
                        units_skipped=done.get("units_skipped", 0))
        if executed and cmd.cmd == "sync":
            self._take_sync_now()
            # The operator's "sync now" (sent by `device enable` too) also ends the backoff
            # of changes a transient refusal holds: they go at this turn, not minutes later.
            self._retry_at.clear()
            # ... and brings what others wrote meanwhile: a device enabled again got no
            # deltas while disabled, and its catch-ups were refused (`device_disabled`).
            self._start_catchup()
        if executed and cmd.cmd in ("wipe", "resync", "scopes"):
            self._inflight.clear()
            self._retry_at.clear()
            self._start_catchup()
        self._send(self._hello_msg())
        if cmd.cmd == "creds":
            self._relogin_soon()


__all__ = ["AGENT_NAME", "ReceiveHooks"]
