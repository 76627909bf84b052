"""The agent daemon's part of a client-certificate renewal (PROTOCOL.md §7.15): the
`cert_renew` command, the `csr` sent (and sent again), the `cert` taken, the reconnect
with it, and the renewal the agent starts itself before its certificate expires.
The certificates and the renewal's durable state are `agent.clientcert`'s.

A mixin of `agent.daemon.AgentDaemon`; runs on the daemon's engine thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog

from agent.caps import CERT_RENEW
from agent.certcheck import BadCert
from agent.clientcert import CSR_RETRY_S, BadRenewal, ClientCerts, auto_id, parse_command
from agent.sync import Sync
from schemas import wire
from waystation.config import AgentConfig
from waystation.mqtt import MqttLink

log = structlog.get_logger("waystation.agent")

AUTO_RETRY_S = 3600.0
"""A renewal the agent starts itself is tried at most this often (the server signs one
an hour; a server without a client CA refuses every one)."""
RELOGIN_FIRST_S = 2.0
RELOGIN_MAX_S = 600.0
DAY_MS = 86_400_000


class CertHooks:
    cfg: AgentConfig
    dev: str
    sync: Sync
    link: MqttLink
    certs: ClientCerts
    _connected: bool
    _send: Callable[[wire.Message], bool]
    _hello_msg: Callable[[], wire.Hello]
    _csr_at: float = 0.0
    _auto_at: float = 0.0
    _cert_relogin_at: float = 0.0
    _cert_relogin_wait: float = RELOGIN_FIRST_S

    def _cert_agreed(self) -> bool:
        caps = self.sync.server_caps
        return caps is not None and CERT_RENEW in caps

    def _cert_command(self, cmd: wire.Command) -> bool:
        """A `cert_renew` command: start (or go on with) the renewal. True when it is
        done already (report it); False: reported once the certificate is stored, or
        refused (never reported)."""
        if self.sync.command_done(cmd.id):
            return True
        try:
            rid, t = parse_command(cmd.args, self.dev)
            if not self.certs.enabled:
                raise BadRenewal("this device connects without a client certificate "
                                 "(mqtt.tls cert_file)")
            csr = self.certs.begin(rid, t, cmd.id)
        except BadRenewal as exc:
            log.warning("bad_cert_renew_command", dev=self.dev, id=cmd.id, reason=str(exc))
            return False
        except (OSError, ValueError) as exc:
            log.error("client_cert_key_not_saved", dev=self.dev, id=cmd.id, error=str(exc),
                      path=str(self.certs.dir),
                      hint="make the data_dir writable; the server sends the command again "
                           "at the next connection")
            return False
        if csr is None:
            return True
        self._send_csr(csr)
        return False

    def _send_csr(self, csr: str) -> None:
        pending = self.certs.pending
        if pending is None or not self._cert_agreed():
            return  # sent by the timer once the server agreed the capability
        self._csr_at = time.monotonic() + CSR_RETRY_S
        self._send(wire.Csr(dev=self.dev, rid=pending.rid, csr=csr))

    def _on_cert(self, msg: wire.CertIssued) -> None:
        try:
            done = self.certs.take(msg.rid, msg.cert, msg.ca, int(time.time() * 1000))
        except BadCert as exc:
            log.warning("client_cert_refused_by_device", dev=self.dev, renewal=msg.rid,
                        reason=str(exc))
            return
        except (OSError, ValueError) as exc:
            log.error("client_cert_not_saved", dev=self.dev, renewal=msg.rid, error=str(exc),
                      hint="the current certificate stays in use; the request is sent "
                           "again")
            return
        if done.cmd:
            self.sync.execute_command(wire.Command(id=done.cmd, cmd="cert_renew"))
        self._send(self._hello_msg())
        self._cert_relogin_wait = RELOGIN_FIRST_S
        self._cert_relogin_at = time.monotonic()

    def _cert_on_connect(self) -> None:
        self._csr_at = 0.0  # send the pending request again once the server agreed

    def _cert_timer(self, now: float) -> None:
        if not self._connected:
            return
        current = self.certs.current
        if (current is not None and self.certs.login_renewal != current.rid
                and now >= self._cert_relogin_at):
            # Connected with an older certificate (a fallback, or the new one just came):
            # connect again with the newest, backing off while the broker refuses it.
            self._cert_relogin_at = now + self._cert_relogin_wait
            self._cert_relogin_wait = min(RELOGIN_MAX_S, self._cert_relogin_wait * 2)
            log.info("client_cert_relogin", dev=self.dev, renewal=current.rid)
            self.link.relogin()
            return
        if not self._cert_agreed():
            return
        if self.certs.pending is not None:
            if now >= self._csr_at:
                csr = self.certs.csr()
                if csr is not None:
                    self._send_csr(csr)
            return
        before = self.cfg.mqtt.tls.renew_before_days if self.cfg.mqtt.tls else 0
        exp = self.certs.expires_ms() if before else None
        wall = int(time.time() * 1000)
        if exp is None or exp - wall > before * DAY_MS or now < self._auto_at:
            return
        self._auto_at = now + AUTO_RETRY_S
        try:
            csr = self.certs.begin(auto_id(wall), 0, "")
        except (OSError, ValueError) as exc:
            log.error("client_cert_key_not_saved", dev=self.dev, error=str(exc),
                      path=str(self.certs.dir), hint="make the data_dir writable")
            return
        log.warning("client_cert_expires_soon", dev=self.dev, expires_ms=exp,
                    renew_before_days=before)
        if csr is not None:
            self._send_csr(csr)


__all__ = ["CertHooks"]
