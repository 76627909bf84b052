"""How a registered device stands, in words an operator can act on (pure).

Used by `waystation device list` and `waystation server devices`, in their table and
their JSON forms, so both say the same thing: enabled or disabled, a wipe pending or
done and when, the store incarnation the device runs, when it last synced, and how far
its reported checkpoints are behind each scope's sequence.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from broker.server.cert_renewal import Renewal
from broker.server.clockskew import describe
from broker.server.rotation import Rotation
from broker.server.store.base import DeviceRow
from waystation.timefmt import ago, iso

OLDEST_SHOWN_MS = 60_000
"""PENDING names its oldest change's age from this age on (younger: a sync under way)."""


def lifecycle(row: DeviceRow) -> str:
    """enabled / disabled, with a wipe pending or done: "wipe pending since T", "wiped at
    T, disabled", ..."""
    if row.wipe_pending:
        return f"wipe pending since {iso(row.wipe_ms)} (disabled)"
    state = "enabled" if row.enabled else "disabled"
    if row.wipe_id:
        state = f"wiped at {iso(row.wipe_done_ms)}, {state}"
    rot = Rotation.from_json(row.rot)
    if rot is not None and rot.stage != "retired":
        state += f"; {rot.describe()}"
    crt = Renewal.from_json(row.crt)
    if crt.stage not in ("", "in use"):
        state += f"; {crt.describe()}"
    if crt.exp:
        state += f"; client certificate expires {iso(crt.exp)}"
    return state


def cert_doc(row: DeviceRow) -> dict[str, Any] | None:
    """The device's client certificate: its expiry and latest renewal, for JSON forms."""
    crt = Renewal.from_json(row.crt)
    if not crt.id and not crt.exp:
        return None
    return {"expires": iso(crt.exp) or None,
            "renewal": None if not crt.id else {
                "id": crt.id, "stage": crt.stage, "command": crt.cmd or None,
                "started": iso(crt.t), "by": "operator" if crt.cmd else "device",
                "issued": iso(crt.issued) or None, "serial": crt.serial or None,
                "not_after": iso(crt.not_after) or None, "stored": iso(crt.stored) or None,
                "in_use": iso(crt.login) or None}}


def rotation_doc(row: DeviceRow) -> dict[str, Any] | None:
    """The device's latest broker password rotation, for the JSON forms."""
    rot = Rotation.from_json(row.rot)
    if rot is None:
        return None
    return {"id": rot.id, "stage": rot.stage, "command": rot.cmd, "ordered": iso(rot.t),
            "stored": iso(rot.stored) or None, "login_with_new": iso(rot.login) or None,
            "switched": iso(rot.switched) or None, "retired": iso(rot.retired) or None,
            "retire_at": iso(rot.retire_at) or None,
            "retired_by": None if not rot.retired else ("deadline" if rot.forced else "login"),
            "failing": None if not rot.failed else {"at": iso(rot.failed),
                                                    "error": rot.error}}


def removal_state(doc: Mapping[str, Any]) -> str:
    """A removed device's login deletion still due (`login_removal.removal_doc`)."""
    state = f"removed; broker login deletion pending since {iso(doc['queued_ms'])}"
    failing = doc.get("failing")
    if failing:
        state += f", failed at {iso(failing['at_ms'])}: {failing['error']} ({failing['hint']})"
    return state


def presence(row: DeviceRow, as_of_ms: int | None = None, now: int | None = None) -> str:
    """The STATE column of `server devices`: lifecycle first, then online/offline, and a
    clock that is off (`clock`, given `now`).
    `as_of_ms` (not None: no merge server runs, `broker.server.liveness`) is when the
    presence was last kept: "online" becomes "online? (as of T)", since nobody marks a
    device that went away offline (0: unknown, no server ever recorded itself)."""
    life = lifecycle(row)
    online = "online" if row.online else "offline"
    if row.online and as_of_ms is not None:
        online = f"online? (as of {iso(as_of_ms) or 'an unknown time'})"
    elif not row.online and not row.last_seen_ms:
        # Not "offline": it never reached a server (not started, wrong broker address
        # or password, ...): what to check is on the device (`agent status`).
        online = "never connected"
    parts = [online] if life == "enabled" else [online, life]
    store = recreated(row)
    if store:
        parts.append(store)
    skew = "" if now is None else clock(row, now)
    if skew:
        parts.append(skew)
    return ", ".join(parts)


CLOCK_STALE_MS = 300_000
"""A clock measured longer ago than this says when ("as of 2d ago")."""


def clock(row: DeviceRow, now: int) -> str:
    """ "clock 3 h behind" when the device's clock was off by more than
    `merge.max_skew_ms` at its last live status (`broker.server.clockskew`), with how
    old that is once it is minutes old (an offline device reports nothing new): "clock
    3 h behind as of 2d ago"; "" when it was right or never measured."""
    text = describe(row.clk, row.clk_ms)
    if text and now - row.clk_ms >= CLOCK_STALE_MS:
        text += f" as of {ago(row.clk_ms, now)}"
    return text


def recreated(row: DeviceRow) -> str:
    """ "store re-created at T" when the device runs a store other than its first (a
    re-imaged device, a new data_dir, a restored backup: what its old store had not
    sent is gone); "" otherwise, and after a wipe, whose new store `lifecycle` says."""
    if row.incs < 2 or not row.inc_ms or (row.wipe_id and row.inc_ms >= row.wipe_ms):
        return ""
    return f"store re-created at {iso(row.inc_ms)} ({row.incs} stores seen)"


def pending(row: DeviceRow, now: int) -> str:
    """The PENDING column of `server devices`: the outbox count the device last reported.
    An online device reports it periodically and within about a second of a change that
    matters (agent.status_report); an offline one cannot, so its count says how old it
    is: "5 (2h ago)". When the oldest of them has waited a minute or more, since when:
    "5 (2h ago), oldest 3d ago"."""
    if row.pend < 0:
        return "-"
    text = str(row.pend) if row.online or not row.pend_ms else (
        f"{row.pend} ({ago(row.pend_ms, now)})")
    if row.pend and row.pend_old_ms and now - row.pend_old_ms >= OLDEST_SHOWN_MS:
        # Changes waiting for minutes or days are what an operator must look into (a
        # device offline, disabled, refused transiently): how long, not only how many.
        text += f", oldest {ago(row.pend_old_ms, now)}"
    return text


def dead_letters(row: DeviceRow) -> str:
    """The DEAD LETTERS column: changes the server refused for good, kept on the device
    for a person (`waystation agent deadletters` there), by its last report."""
    return "-" if row.dl < 0 else str(row.dl)


def progress(row: DeviceRow, seqs: Mapping[str, int], now: int | None = None) -> str:
    """Per scope: the device's reported checkpoint / the scope's sequence. A device
    reports its checkpoints when it connects and when it asks for a catch-up, not as live
    changes reach it: when one looks behind, `now` adds how old the report is ("route-1
    120/5000 (reported 3h ago)"), else a device online for hours looks hours behind."""
    text = ", ".join(f"{s} {row.cp[s]}/{seqs.get(s, 0)}" if s in row.cp
                     else f"{s} ?/{seqs.get(s, 0)}" for s in row.scopes)
    behind = any(row.cp.get(s, 0) < seqs.get(s, 0) for s in row.scopes if s in row.cp)
    if now is not None and behind and row.cp_ms:
        text += f" (reported {ago(row.cp_ms, now)})"
    return text


def device_doc(row: DeviceRow, seqs: Mapping[str, int] | None = None) -> dict[str, Any]:
    """The JSON form, the same in `device list --json` and `server devices --json`."""
    doc: dict[str, Any] = {
        "id": row.id, "scopes": list(row.scopes), "enabled": row.enabled,
        "state": lifecycle(row), "online": row.online, "created": iso(row.created_ms),
        "last_seen": iso(row.last_seen_ms), "last_sync": iso(row.synced_ms),
        "agent": row.agent, "sv": row.sv, "pending": None if row.pend < 0 else row.pend,
        "pending_reported": iso(row.pend_ms) or None,
        "pending_oldest": iso(row.pend_old_ms) or None if row.pend > 0 else None,
        "dead_letters": None if row.dl < 0 else row.dl,
        "clock": None if not row.clk_ms else {
            "offset_ms": row.clk, "off": bool(row.clk), "measured": iso(row.clk_ms),
            "note": describe(row.clk, row.clk_ms) or None},
        "store": {"incarnation": row.inc or None, "since": iso(row.inc_ms),
                  "incarnations_seen": row.incs},
        "wipe": None if not row.wipe_id else {
            "command": row.wipe_id, "ordered": iso(row.wipe_ms),
            "done": iso(row.wipe_done_ms) or None},
        "password_rotation": rotation_doc(row),
        "client_cert": cert_doc(row),
    }
    if seqs is not None:
        doc["checkpoints"] = {
            s: {"reported": row.cp.get(s), "seq": seqs.get(s, 0),
                "behind": None if s not in row.cp else max(0, seqs.get(s, 0) - row.cp[s])}
            for s in row.scopes}
        doc["checkpoints_reported"] = iso(row.cp_ms)
    return doc


__all__ = ["ago", "cert_doc", "clock", "dead_letters", "device_doc", "iso", "lifecycle", "pending",
           "presence",
           "progress", "recreated", "removal_state", "rotation_doc"]
