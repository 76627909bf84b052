"""The device's client certificates, and renewing them (PROTOCOL.md §7.15, capability
`cert_renew`); the checks themselves are in `agent.certcheck`.

A renewal, started by the operator's `cert_renew` command or by the agent when its
certificate expires within `mqtt.tls.renew_before_days`, goes:

1. A new EC P-256 key is made and written durably (``<data_dir>/client-cert/<id>.key``,
   0600, temp file + fsync + rename) and recorded as pending in ``state.json`` before
   any request leaves the device. A crash at any point leaves either no renewal (the
   command comes again) or the pending key, whose request is sent again: the key is
   never made twice for one renewal, so the server's "one key per renewal" holds.
2. The `csr` goes up (again after every reconnect and every `CSR_RETRY_S` until the
   certificate comes).
3. The `cert` is checked (`certcheck.check_issued`), written durably, and becomes the
   current one; the certificate it replaces is kept as the fallback (and the configured
   files stay the last one). Only then is the command reported done.
4. The agent reconnects with it; a broker that refuses it makes the link fall back to
   the previous one (`cert_files` / `refused`), which stays valid until it expires.

`ClientCerts` is what `waystation.mqtt.MqttLink` asks before each connection attempt
(`CertProvider`), from its network thread; the daemon changes it from its engine
thread, hence the lock.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import re
import secrets
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import structlog

from agent import certcheck
from agent.creds import read_private, write_private
from agent.login_choice import LoginChoice
from schemas.wire import ID_PATTERN
from waystation.timefmt import iso

log = structlog.get_logger(__name__)

DIR_NAME = "client-cert"
STATE = "state.json"
FORMAT = 1
CSR_RETRY_S = 30.0
_MAX_STATE = 8192
_ID_RE = re.compile(ID_PATTERN)


class BadRenewal(ValueError):
    """A `cert_renew` command the device refuses (malformed, another device's, a replay)."""


@dataclass(frozen=True)
class Held:
    """A renewed certificate on disk (file names inside the directory)."""

    rid: str
    t: int
    cert: str
    key: str
    exp: int


@dataclass(frozen=True)
class Pending:
    """A renewal under way: its key is on disk, its certificate has not come."""

    rid: str
    t: int
    """When the operator ordered it (ms, server time); 0: the agent started it."""
    cmd: str
    """The `cert_renew` command to report done once the certificate is stored ("": the
    agent started it)."""
    key: str


def parse_command(args: Any, dev: str) -> tuple[str, int]:
    """The renewal id and time of a `cert_renew` command's `args` ({dev, renewal, t})."""
    if not isinstance(args, dict):
        raise BadRenewal("args must be an object")
    if args.get("dev") != dev:
        raise BadRenewal(f"the renewal is for device {args.get('dev')!r}, not {dev!r}")
    rid, t = args.get("renewal"), args.get("t")
    if not isinstance(rid, str) or not _ID_RE.fullmatch(rid):
        raise BadRenewal("args.renewal must be a renewal id")
    if not isinstance(t, int) or isinstance(t, bool) or not 0 < t < 2**53:
        raise BadRenewal("args.t must be a positive integer (ms)")
    return rid, t


def auto_id(now_ms: int) -> str:
    return f"a-{now_ms:x}-{secrets.token_hex(3)}"


class ClientCerts:
    """The certificates this device may connect with, newest first, and the renewal
    under way (see the module docstring)."""

    def __init__(self, data_dir: Path, dev: str, cert_file: str | None,
                 key_file: str | None) -> None:
        self.dev = dev
        self.dir = Path(data_dir) / DIR_NAME
        self.path = self.dir / STATE
        self._configured = (cert_file, key_file) if cert_file and key_file else None
        self._lock = threading.Lock()
        self.current: Held | None = None
        self.previous: Held | None = None
        self.pending: Pending | None = None
        self._choice: LoginChoice[Held, tuple[str, str]] = LoginChoice()
        self._login: Held | None = None
        self._login_files: tuple[str, str] | None = None
        self._load()

    @classmethod
    def from_config(cls, cfg: Any) -> ClientCerts:
        """For an `AgentConfig`: its data_dir, device id and `mqtt.tls` files."""
        tls = cfg.mqtt.tls
        return cls(cfg.data_dir, cfg.device_id,
                   None if tls is None or tls.cert_file is None else str(tls.cert_file),
                   None if tls is None or tls.key_file is None else str(tls.key_file))

    @property
    def enabled(self) -> bool:
        """The device connects with a client certificate at all."""
        return self._configured is not None or self.current is not None

    # ------------------------------------------------------------- the renewal

    def begin(self, rid: str, t: int, cmd: str) -> str | None:
        """Start renewal `rid` (or go on with it, after a crash or a resent command):
        its key on disk first, then the request to send. None: the device already holds
        that renewal's certificate (report the command done)."""
        with self._lock:
            if any(h is not None and h.rid == rid for h in (self.current, self.previous)):
                return None
            pending = self.pending
            if pending is not None and pending.rid == rid:
                if cmd and not pending.cmd:
                    self.pending = Pending(rid, pending.t, cmd, pending.key)
                    self._save()
                return self._csr_locked()
            # Only the operator's renewals are ordered (by server time): the agent's own
            # carry t = 0 and yield to any command.
            held = (self.current, self.previous, pending)
            newest = max((h.t for h in held if h is not None), default=0)
            if cmd and t <= newest:
                raise BadRenewal(f"renewal {rid} is older than the one this device holds "
                                 "(a replay)")
            key = certcheck.new_key()
            name = f"{rid}.key"
            write_private(self.dir / name, certcheck.key_pem(key))
            old = self.pending
            self.pending = Pending(rid, t, cmd, name)
            self._save()
            if old is not None:
                self._remove(old.key)
        log.warning("client_cert_renewal_started", renewal=rid, by_operator=bool(cmd))
        return self.csr()

    def csr(self) -> str | None:
        """The request of the renewal under way (None: none)."""
        with self._lock:
            return self._csr_locked()

    def _csr_locked(self) -> str | None:
        if self.pending is None:
            return None
        key = certcheck.load_key((self.dir / self.pending.key).read_bytes())
        return certcheck.csr_pem(key, self.dev)

    def take(self, rid: str, cert_pem: str, ca_pem: str, now_ms: int) -> Pending:
        """Check and store the certificate of renewal `rid`; it becomes the current one.
        Returns the renewal it completed. `certcheck.BadCert` when refused."""
        with self._lock:
            pending = self.pending
            if pending is None or pending.rid != rid:
                raise certcheck.BadCert(f"cert: renewal {rid} is not the one under way")
            key = certcheck.load_key((self.dir / pending.key).read_bytes())
            anchor = self._anchor()
            now = datetime.datetime.fromtimestamp(now_ms / 1000, datetime.UTC)
            checked = certcheck.check_issued(cert_pem, ca_pem, key, self.dev, anchor,
                                             now)
            name = f"{rid}.crt"
            write_private(self.dir / name, checked.pem)
            dropped = self.previous
            self.previous = self.current
            self.current = Held(rid, pending.t, name, pending.key, checked.not_after_ms)
            self.pending = None
            self._choice.restart()
            self._save()
            if dropped is not None:
                self._remove(dropped.cert)
                self._remove(dropped.key)
        log.warning("client_cert_renewed", renewal=rid, expires_ms=checked.not_after_ms)
        return pending

    def expires_ms(self) -> int | None:
        """When the newest certificate held expires."""
        with self._lock:
            if self.current is not None:
                return self.current.exp
            anchor = self._anchor()
        return None if anchor is None else certcheck.not_after_ms(anchor)

    @property
    def login_renewal(self) -> str | None:
        """The renewal whose certificate the live connection presented (`hello.crt`)."""
        with self._lock:
            return None if self._login is None else self._login.rid

    def login_expires_ms(self) -> int | None:
        """When the certificate the live connection presented expires (`hello.cexp`)."""
        with self._lock:
            login, files = self._login, self._login_files
        if login is not None:
            return login.exp
        if files is None:
            return None
        with contextlib.suppress(OSError):
            return certcheck.not_after_ms(Path(files[0]).read_bytes())
        return None

    def doc(self) -> dict[str, Any]:
        """For `agent status`."""
        with self._lock:
            return {"current": None if self.current is None else asdict(self.current),
                    "previous": None if self.previous is None else asdict(self.previous),
                    "pending": None if self.pending is None else asdict(self.pending)}

    # ------------------------------------------------------------- CertProvider

    def cert_files(self) -> tuple[str, str] | None:
        """The certificate and key files for the next connection attempt."""
        with self._lock:
            files = self._choice.pick(self._candidates())
            if files is not None:
                self._login_files = files
            return files

    def refused(self) -> None:
        """The attempt with the files just given failed: try the next ones next time."""
        with self._lock:
            tried = self._choice.refused()
        if tried is not None:
            log.warning("client_cert_refused", renewal=tried.rid,
                        hint="falling back to the previous certificate")

    def accepted(self) -> None:
        with self._lock:
            self._login = self._choice.accepted()

    # ------------------------------------------------------------- internals

    def _candidates(self) -> list[tuple[Held | None, tuple[str, str]]]:
        out: list[tuple[Held | None, tuple[str, str]]] = [
            (h, (str(self.dir / h.cert), str(self.dir / h.key)))
            for h in (self.current, self.previous) if h is not None]
        if self._configured is not None:
            cert, key = self._configured
            out.append((None, (cert, key)))
        return out

    def _anchor(self) -> bytes | None:
        for held in (self.current, self.previous):
            if held is not None:
                with contextlib.suppress(OSError):
                    return (self.dir / held.cert).read_bytes()
        if self._configured is not None:
            with contextlib.suppress(OSError):
                return Path(self._configured[0]).read_bytes()
        return None

    def _remove(self, name: str) -> None:
        with contextlib.suppress(OSError):
            (self.dir / name).unlink()

    def _save(self) -> None:
        doc = {"v": FORMAT,
               "current": None if self.current is None else asdict(self.current),
               "previous": None if self.previous is None else asdict(self.previous),
               "pending": None if self.pending is None else asdict(self.pending)}
        write_private(self.path, json.dumps(doc, sort_keys=True).encode("utf-8"))

    def _load(self) -> None:
        try:
            doc = read_private(self.path, _MAX_STATE, FORMAT)
        except OSError as exc:
            log.error("client_cert_state_unreadable", path=str(self.path), error=str(exc),
                      hint="using the configured certificate; fix the file's permissions")
            return
        except ValueError:
            log.error("client_cert_state_damaged", path=str(self.path),
                      hint="using the configured certificate (mqtt.tls cert_file)")
            return
        if doc is None:
            return
        self.current = _held(doc.get("current"), self.dir)
        self.previous = _held(doc.get("previous"), self.dir)
        pending = doc.get("pending")
        if isinstance(pending, dict):
            with contextlib.suppress(TypeError):
                p = Pending(**pending)
                if _safe_name(p.key) and (self.dir / p.key).is_file():
                    self.pending = p


def client_cert_status(cfg: Any) -> dict[str, Any] | None:
    """For `agent status`: the certificate the agent connects with and its renewal
    (read from the files; the daemon need not run). None: no client certificate."""
    tls = cfg.mqtt.tls
    certs = ClientCerts.from_config(cfg)
    if not certs.enabled:
        return None
    exp = certs.expires_ms()
    return {"expires_ms": exp,
            "expires": None if exp is None else iso_ms(exp),
            "renew_before_days": 0 if tls is None else tls.renew_before_days,
            "renewal_under_way": None if certs.pending is None else certs.pending.rid,
            **certs.doc()}


def describe_client_cert(doc: dict[str, Any]) -> str:
    text = f"expires {doc['expires'] or 'unknown (the file cannot be read)'}"
    if doc["current"] is not None:
        text += f", renewed ({doc['current']['rid']})"
    if doc["renewal_under_way"]:
        text += f"; renewal {doc['renewal_under_way']} under way: key made, waiting for " \
                "the server's certificate"
    return text


def iso_ms(ms: int) -> str:
    return iso(ms)


def _safe_name(name: Any) -> bool:
    return isinstance(name, str) and bool(_ID_RE.fullmatch(name)) and "/" not in name


def _held(data: Any, where: Path) -> Held | None:
    if not isinstance(data, dict):
        return None
    try:
        held = Held(**data)
    except TypeError:
        return None
    if not (_safe_name(held.cert) and _safe_name(held.key)):
        return None
    if not ((where / held.cert).is_file() and (where / held.key).is_file()):
        return None
    return held


__all__ = ["CSR_RETRY_S", "DIR_NAME", "BadRenewal", "ClientCerts", "Held", "Pending",
           "auto_id", "client_cert_status", "describe_client_cert", "parse_command"]
