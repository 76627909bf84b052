"""The scopes a device follows, and changing them when the server says so.

A device starts with the scopes of its config (`scopes = [...]`). The operator can
change them later (`waystation device scopes ID --add S --remove S`); the server then
sends a `scopes` command (PROTOCOL.md §7.9, capability `scopes`) with the complete new
list, and `apply_scopes` carries it out in one transaction: removed scopes' records
leave the device (its own pending writes stay until the server acks or refuses them),
added scopes start at checkpoint 0 so the next catch-up brings them.

The list the server set is kept in meta ``scopes`` together with the config's list at
that moment. Whichever changed last wins: if the config's scopes are edited afterwards,
the config is followed again (an operator who edits the file means it).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import structlog

from agent.store import split_record_key
from schemas.wire import ID_PATTERN

if TYPE_CHECKING:
    from agent.core import Work

log = structlog.get_logger(__name__)

META_KEY = "scopes"
MAX_SCOPES = 1000
_ID_RE = re.compile(ID_PATTERN)


class BadScopes(ValueError):
    """A `scopes` command whose list is not a usable set of scope ids."""


def effective(doc: Any, configured: tuple[str, ...]) -> tuple[str, ...]:
    """The scopes to follow: the server's list in `doc` (meta ``scopes``) while the
    config still says what it said when the server set it; otherwise the config's."""
    if not isinstance(doc, dict):
        return configured
    scopes, cfg = doc.get("set"), doc.get("cfg")
    if not isinstance(scopes, list) or not isinstance(cfg, list) or tuple(cfg) != configured:
        return configured
    return tuple(scopes)


def parse(args: Any) -> tuple[str, ...]:
    """The new scope list of a `scopes` command's args: 1 to MAX_SCOPES scope ids,
    duplicates dropped, order kept."""
    scopes = args.get("scopes") if isinstance(args, dict) else None
    if not isinstance(scopes, list) or not scopes or len(scopes) > MAX_SCOPES:
        raise BadScopes(f"args.scopes must be a list of 1 to {MAX_SCOPES} scope ids")
    out: list[str] = []
    for scope in scopes:
        if not isinstance(scope, str) or not _ID_RE.fullmatch(scope):
            raise BadScopes(f"{scope!r} is not a scope id")
        if scope not in out:
            out.append(scope)
    return tuple(out)


def apply_scopes(work: Work, new: Sequence[str]) -> tuple[list[str], list[str]]:
    """Follow `new` from now on (inside the command's transaction); returns the scopes
    (added, removed). Records of removed scopes leave the base, and their views keep only
    this device's pending writes; their checkpoints go, so a scope added back later is
    caught up from zero."""
    core = work.core
    old = core.scopes
    added = [s for s in new if s not in old]
    removed = [s for s in old if s not in new]
    tx = work.tx
    if removed:
        gone = set(removed)
        doomed = [rk for rk, doc in tx.items("base") if doc.get("s") in gone]
        for rk in doomed:
            c, k = split_record_key(rk)
            work.save_base(rk, work.load_base(rk, c, k), None)
            work.refresh_view(rk, c, k, None)
            work.feed(c, k, "dropped")
        for rk in [rk for rk, doc in tx.items("evicted") if doc.get("s") in gone]:
            tx.delete("evicted", rk)
        for scope in removed:
            tx.delete("checkpoints", scope.encode())
        denied = [s for s in tx.meta("denied", []) if s not in gone]
        tx.set_meta("denied", denied)
    tx.set_meta(META_KEY, {"set": list(new), "cfg": list(core.settings.scopes)})
    core.scopes = tuple(new)
    return added, removed


def carry_out(work: Work, command_id: str, args: Any) -> None:
    """The `scopes` command `command_id` with `args`; a malformed list is logged and
    ignored (the command still counts as done, so that it is not sent again)."""
    try:
        added, removed = apply_scopes(work, parse(args))
    except BadScopes as exc:
        log.warning("bad_scopes_command", dev=work.dev, id=command_id, reason=str(exc))
        return
    log.warning("scopes_changed", dev=work.dev, id=command_id, added=added,
                removed=removed, scopes=list(work.core.scopes))


__all__ = ["MAX_SCOPES", "META_KEY", "BadScopes", "apply_scopes", "carry_out", "effective", "parse"]
