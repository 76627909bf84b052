"""A device's client-certificate renewal: its stages, and what a `csr` and a `hello`
change (pure; PROTOCOL.md §7.15, capability `cert_renew`).

The private key never leaves the device: the operator (`waystation device renew-cert`)
queues a `cert_renew` command, or the device starts a renewal itself when its
certificate nears expiry; the device makes a new key, sends a `csr`; the server checks
and signs it with the client CA of `[enrol]` and answers with `cert`. Nothing on the
broker changes: it trusts every certificate of the CA, so the old certificate keeps
working until it expires and the device is never locked out.

    asked     a `cert_renew` command is queued (operator); no request yet
    issued    the server signed the device's request and sent the certificate
    stored    the device reported the command done: the certificate is on its disk
    in use    the device connected with it (`hello.crt`)

Kept in the device row (`DeviceRow.crt`) with the expiry of the certificate the device
last connected with (`hello.cexp`), for `device list`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

Stage = Literal["", "asked", "issued", "stored", "in use"]

MIN_AUTO_INTERVAL_MS = 3600_000
"""A renewal the device starts itself is signed at most once an hour: a device that
keeps asking cannot make the server sign without bound."""


@dataclass(frozen=True)
class Renewal:
    """The device's latest renewal ("" id: none) and its certificate's reported expiry."""

    id: str = ""
    t: int = 0
    """When it started (ms): ordered by the operator, or the device's first request."""
    cmd: str = ""
    """The `cert_renew` command that asked for it ("" when the device started it)."""
    days: int = 0
    """Validity the operator asked for (0: `enrol.client_cert_days`)."""
    issued: int = 0
    serial: str = ""
    not_after: int = 0
    key: str = ""
    """Fingerprint of the signed public key: a resent request for the same key gets the
    same certificate, one for another key is refused."""
    pem: str = ""
    """The signed certificate, kept until the device connects with it (resends)."""
    stored: int = 0
    login: int = 0
    exp: int = 0
    """When the certificate the device last connected with expires (`hello.cexp`)."""

    @property
    def stage(self) -> Stage:
        if not self.id:
            return ""
        if self.login:
            return "in use"
        if self.stored:
            return "stored"
        return "issued" if self.issued else "asked"

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v}

    @classmethod
    def from_json(cls, data: Any) -> Renewal:
        if not isinstance(data, dict):
            return cls()
        names = {f.name: f.type for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except TypeError:
            return cls()

    def describe(self) -> str:
        """For `device list` and `server devices`."""
        return {"": "", "asked": f"certificate renewal {self.id}: asked, no request yet",
                "issued": f"certificate renewal {self.id}: signed and sent",
                "stored": f"certificate renewal {self.id}: stored by the device",
                "in use": f"certificate renewal {self.id}: in use"}[self.stage]


class Refused(ValueError):
    """A `csr` the server does not sign; the message tells the device's operator why."""


Decision = Literal["sign", "resend"]


def on_csr(state: Renewal, rid: str, key: str, now: int) -> tuple[Decision, Renewal]:
    """Whether to sign a request of renewal `rid` for the key with fingerprint `key`, and
    the state that follows (the signature itself is recorded by `signed`)."""
    if rid == state.id:
        if not state.issued:
            return "sign", state
        if state.key != key:
            raise Refused(f"renewal {rid} was already signed for another key (a replayed "
                          "or forged request); start a new renewal")
        if not state.pem:
            raise Refused(f"renewal {rid} is done and in use; start a new renewal")
        return "resend", state
    if state.cmd and not state.issued:
        raise Refused(f"the operator ordered renewal {state.id}: answer that command "
                      f"instead of renewal {rid}")
    if state.issued and now - state.issued < MIN_AUTO_INTERVAL_MS:
        raise Refused("a certificate was signed for this device less than an hour ago; "
                      "renewals the device starts itself wait an hour between signatures")
    return "sign", Renewal(id=rid, t=now, exp=state.exp)


def signed(state: Renewal, *, serial: str, not_after: int, key: str, pem: str,
           now: int) -> Renewal:
    return dataclasses.replace(state, issued=now, serial=serial, not_after=not_after,
                               key=key, pem=pem)


def on_hello(state: Renewal, done: set[str], crt: str | None, cexp: int | None,
             now: int) -> Renewal:
    """The command reported done (stored), a connection made with the new certificate
    (in use: the kept PEM is dropped), the expiry of the certificate in use."""
    out = state
    if cexp is not None and cexp != out.exp:
        out = dataclasses.replace(out, exp=cexp)
    if not out.id:
        return out
    if out.cmd and out.cmd in done and not out.stored and out.issued:
        out = dataclasses.replace(out, stored=now)
    if crt == out.id and not out.login and out.issued:
        out = dataclasses.replace(out, login=now, stored=out.stored or now, pem="")
    return out


def ordered(state: Renewal, rid: str, cmd: str, days: int, now: int) -> Renewal:
    """A renewal the operator orders; supersedes any earlier one."""
    return Renewal(id=rid, t=now, cmd=cmd, days=days, exp=state.exp)


__all__ = ["MIN_AUTO_INTERVAL_MS", "Decision", "Refused", "Renewal", "Stage", "on_csr",
           "on_hello", "ordered", "signed"]
