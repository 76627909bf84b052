"""`waystation agent salvage`: the pending writes of an old (moved-aside, damaged) store,
queued again in the device's current store.

A damaged store is moved aside and the agent starts on a fresh one (deploy/README.md, "A
damaged device store"); the writes the old store still held in its outbox (saved on the
device, never acknowledged) would be lost for the user. Salvage reads what it can of the
old store (`agent.salvage_read`: read-only, in child processes, past damaged pages),
and queues each readable pending change again as a new local write of the current store:
through the normal write path (view, indexes, feed event, outbox), with a new change id
of the current store's incarnation, in the old order, a transaction's changes again as
one transaction, with their priority and creation time.

What the server does with it (docs/PROTOCOL.md §5): each salvaged change KEEPS its
original stamp (the time part `h`) and base version `b`; only its id is new. So it is
merged as the late write it is, never as a write made now:

- lww: it wins only over values stamped before it; a value another device (or this one,
  on its fresh store) wrote later stays, and the salvaged value goes to the conflict log
  as the loser. If the original change had reached the server before the damage, the
  stored value carries the same stamp: the same event, nothing changes.
- manual: its old base did not see later values, so it opens a conflict (a person
  decides) instead of replacing them.
- delete: its old stamp deletes only what was written before it.
- counter increments and set adds are identified by change ids: if the ORIGINAL change
  had reached the server (its ack lost with the store), the salvaged one adds again.
  Salvage skips a change the current store shows as applied (a field, a tombstone or a
  set tag carrying the old change's stamp or id: "already synced"); for the rest it
  cannot tell, and lists them as "uncertain" (`--skip-uncertain` leaves them out).

Idempotence: every salvaged change is recorded in the current store's meta, in the same
transaction that queues it (``salvaged:<h>:<n>`` -> {"as": new change id, "t"}): the
stamp's time part and the old change number name the change for good, even when the old
store's meta page (its incarnation) is unreadable. Running salvage again skips them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from agent import evicted, validate
from agent.api import Agent
from agent.changes import change_id
from agent.core import Work
from agent.crypto import ValueCipher
from agent.errors import BadRequest, EncryptionKeyError
from agent.keyring import KeyEncryptionKey, data_cipher
from agent.models import WriteResult
from agent.salvage_read import RawRead, read_store
from agent.store import ENV_DIRNAME, n_key, record_key
from agent.transaction import mark
from waystation.errors import ConfigError, WaystationError

LEDGER = "salvaged:"


class SalvageInputError(ConfigError):
    """The path given is not a store salvage can read (exit 2)."""


class SalvageFailed(WaystationError):
    """Nothing of the old store can be read (exit 1)."""


@dataclass
class Item:
    n: int
    entry: dict[str, Any]
    state: str = "recovered"  # recovered | already_salvaged | already_synced | refused
    uncertain: bool = False
    queued_as: str | None = None
    reason: str | None = None

    @property
    def ch(self) -> dict[str, Any]:
        ch: dict[str, Any] = self.entry["ch"]
        return ch

    def to_dict(self, dev: str) -> dict[str, Any]:
        ch = self.ch
        doc: dict[str, Any] = {"n": self.n, "change_id": change_id(dev, self.n), "op": ch["op"],
                               "collection": ch["c"], "key": ch["k"], "stamp": ch["h"],
                               "created_ms": self.entry.get("t")}
        if self.entry.get("x"):
            doc["transaction"] = self.entry["x"]
        if self.state == "recovered":
            doc["uncertain"] = self.uncertain
            doc["queued_as"] = self.queued_as
        if self.queued_as and self.state == "already_salvaged":
            doc["queued_as"] = self.queued_as
        if self.reason:
            doc["reason"] = self.reason
        return doc


@dataclass
class Report:
    source: str
    dry_run: bool
    device: str | None = None
    incarnation: str | None = None
    encrypted: bool = False
    meta_error: str | None = None
    items: list[Item] = field(default_factory=list)
    bad: list[dict[str, Any]] = field(default_factory=list)
    lost: list[tuple[int, int]] = field(default_factory=list)
    reads: int = 0
    skipped_uncertain: bool = False

    def of(self, state: str) -> list[Item]:
        return [i for i in self.items if i.state == state]

    def to_dict(self, dev: str) -> dict[str, Any]:
        rec = self.of("recovered")
        return {
            "source": self.source, "dry_run": self.dry_run,
            "old_store": {"device": self.device, "incarnation": self.incarnation,
                          "encrypted": self.encrypted, "meta_error": self.meta_error},
            "counts": {"readable": len(self.items), "recovered": len(rec),
                       "uncertain": sum(1 for i in rec if i.uncertain),
                       "already_salvaged": len(self.of("already_salvaged")),
                       "already_synced": len(self.of("already_synced")),
                       "refused": len(self.of("refused")),
                       "unreadable_entries": len(self.bad),
                       "unreadable_ranges": len(self.lost)},
            "recovered": [i.to_dict(dev) for i in rec],
            "already_salvaged": [i.to_dict(dev) for i in self.of("already_salvaged")],
            "already_synced": [i.to_dict(dev) for i in self.of("already_synced")],
            "refused": [i.to_dict(dev) for i in self.of("refused")],
            "unreadable": {"entries": self.bad, "ranges": [list(r) for r in self.lost]},
            "reads": self.reads}


# ----------------------------------------------------------------- the source


def source_dir(path: Path, current_env: Path) -> Path:
    """The old store's LMDB directory from what the operator named (the moved-aside
    directory, its data.mdb, or a data_dir holding agent.lmdb); refuses the rest."""
    if not path.exists():
        raise SalvageInputError(f"{path} does not exist: give the directory the damaged store "
                                "was moved to (e.g. agent.lmdb.damaged-2026-01-31)")
    if path.is_file():
        if path.name != "data.mdb":
            raise SalvageInputError(f"{path} is a file, not an agent store: give the directory "
                                    "that holds its data.mdb")
        path = path.parent
    elif not (path / "data.mdb").exists() and (path / ENV_DIRNAME / "data.mdb").exists():
        path = path / ENV_DIRNAME
    if not (path / "data.mdb").is_file():
        raise SalvageInputError(f"{path} is not an agent store (no data.mdb in it): give the "
                                "directory the damaged store was moved to")
    if os.path.realpath(path) == os.path.realpath(current_env):
        raise SalvageInputError(f"{path} is the agent's current store: salvage reads a store "
                                "moved aside (`mv agent.lmdb agent.lmdb.damaged-DATE`), into "
                                "the current one")
    return path


def _cipher(env_dir: Path, token: str | None, key_file: Path | None) -> ValueCipher | None:
    if token is None:
        return None
    if key_file is None:
        raise EncryptionKeyError(
            f"the store at {env_dir} is encrypted: give `--key-file PATH`, the key file it "
            "was encrypted with (default: storage.encryption_key_file of the config)")
    kek = KeyEncryptionKey.from_file(key_file, "--key-file")
    cipher = data_cipher(env_dir, kek, new_store=False)
    if not cipher.verify(bytes.fromhex(token)):
        raise EncryptionKeyError(f"the key file {key_file} is not the key the store at "
                                 f"{env_dir} was encrypted with")
    return cipher


def _meta(raw: RawRead, name: str) -> Any:
    value = raw.meta.get(name)
    if value is None:
        return None
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError:
        return None


def _decode(n: int, value: bytes, cipher: ValueCipher | None) -> dict[str, Any]:
    """One outbox entry; ValueError saying why it cannot be used."""
    if cipher is not None:
        try:
            value = cipher.open(b"outbox\0" + n_key(n), value)
        except EncryptionKeyError as exc:
            raise ValueError(f"does not decrypt ({exc})") from None
    try:
        entry = orjson.loads(value)
    except orjson.JSONDecodeError:
        raise ValueError("is not a stored change (damaged bytes)") from None
    ch = entry.get("ch") if isinstance(entry, dict) else None
    if not isinstance(ch, dict) or ch.get("n") != n or ch.get("op") not in ("put", "del") \
            or not all(isinstance(ch.get(m), str) for m in ("h", "c", "k", "s")) \
            or not isinstance(ch.get("b"), int):
        raise ValueError("is not a stored change (damaged bytes)")
    return dict(entry)


def read_old(env_dir: Path, dev: str, key_file: Path | None, dry_run: bool) -> Report:
    """Read the old store: its identity (refusing another device's store) and every
    outbox entry that still reads."""
    raw = read_store(env_dir)
    if raw.open_error is not None:
        raise SalvageFailed(f"LMDB cannot open {env_dir / 'data.mdb'} at all "
                            f"({raw.open_error}): nothing in it can be salvaged by this "
                            "command; keep the directory")
    report = Report(str(env_dir), dry_run, reads=raw.children, lost=raw.lost,
                    meta_error=raw.meta_error)
    report.device, report.incarnation = _meta(raw, "device"), _meta(raw, "inc")
    if report.device is not None and report.device != dev:
        raise SalvageInputError(f"the store at {env_dir} belongs to device "
                                f"{report.device!r}, not to this agent's {dev!r}: salvage "
                                "it on that device (or with its agent config)")
    token = _meta(raw, "enc")
    report.encrypted = token is not None
    cipher = _cipher(env_dir, token, key_file)
    for n in sorted(raw.entries):
        try:
            report.items.append(Item(n, _decode(n, raw.entries[n], cipher)))
        except ValueError as exc:
            report.bad.append({"n": n, "reason": f"change {dev}:{n} {exc}"})
    return report


# ------------------------------------------------------------- the current store


class _DryRun(Exception):  # a control-flow signal: abort the write transaction
    def __init__(self, value: Any) -> None:
        super().__init__()
        self.value = value


def _ledger_key(ch: Mapping[str, Any]) -> str:
    return f"{LEDGER}{ch['h']}:{ch['n']}"


def _synced(work: Work, dev: str, ch: Mapping[str, Any]) -> bool:
    """The current store's base (what the server sent it) carries this change: a field
    or tombstone with its stamp, or a set member with its add-tag."""
    rk = record_key(ch["c"], ch["k"])
    stamp = f"{ch['h']}:{dev}"
    stamps = work.tx.get("stamps", rk) or {}
    if any(stamps.get(name) == stamp for name in ch.get("f") or {}):
        return True
    base = work.load_base(rk, ch["c"], ch["k"])
    if base is None:
        return False
    if ch["op"] == "del" and base.xh == stamp:
        return True
    tag = change_id(dev, ch["n"])
    return any(tag in base.t.get(name, {}).get(m, []) for name, ms in (ch.get("a") or {}).items()
               for m in ms)


def _groups(items: list[Item]) -> list[list[Item]]:
    """The changes in their old order, a transaction's changes together."""
    out: list[list[Item]] = []
    by_txn: dict[tuple[int, int], list[Item]] = {}
    for item in items:
        x = item.entry.get("x")
        if isinstance(x, list) and len(x) == 2:
            group = by_txn.get((x[0], x[1]))
            if group is not None:
                group.append(item)
                continue
            by_txn[(x[0], x[1])] = group = [item]
            out.append(group)
        else:
            out.append([item])
    return out


def salvage(agent: Agent, report: Report, *, skip_uncertain: bool = False) -> Report:
    """Queue the report's readable changes in `agent`'s store (or, dry run, try each
    group in a write transaction that is then aborted)."""
    dev = agent.device_id
    report.skipped_uncertain = skip_uncertain
    moved: dict[str, str] = {}  # an old change id -> the id it was queued as (set tags)

    def classify(work: Work) -> None:
        for item in report.items:
            done = work.tx.meta(_ledger_key(item.ch))
            if done is not None:
                item.state, item.queued_as = "already_salvaged", done.get("as")
                moved[change_id(dev, item.n)] = str(done.get("as"))
            elif _synced(work, dev, item.ch):
                item.state = "already_synced"
            item.uncertain = bool(item.ch.get("i") or item.ch.get("a"))

    agent._read(classify)
    for group in _groups([i for i in report.items if i.state == "recovered"]):
        if skip_uncertain and any(i.uncertain for i in group):
            for item in group:
                item.state, item.reason = "refused", "uncertain: left out (--skip-uncertain)"
            continue
        _one_group(agent, group, moved, report.dry_run)
    if not report.dry_run and report.of("recovered"):
        agent._poke()
    return report


def _one_group(agent: Agent, group: list[Item], moved: dict[str, str], dry_run: bool) -> None:
    dev = agent.device_id

    def run(work: Work) -> list[WriteResult]:
        results = [_requeue(agent, work, item, moved) for item in group]
        mark(work, results)
        for item, result in zip(group, results, strict=True):
            work.tx.set_meta(_ledger_key(item.ch),
                             {"as": result.change_id, "t": work.now()})
        if dry_run:
            raise _DryRun(results)
        return results

    try:
        results = agent._commit(run)
    except _DryRun as peek:
        results = peek.value
    except BadRequest as exc:  # WriteRefused: the current schema or scopes refuse it
        for item in group:
            item.state, item.reason = "refused", str(exc)
        return
    for item, result in zip(group, results, strict=True):
        item.queued_as = None if dry_run else result.change_id
        moved[change_id(dev, item.n)] = result.change_id or ""


def _requeue(agent: Agent, work: Work, item: Item, moved: Mapping[str, str]) -> WriteResult:
    """One old change through the normal write path, keeping its stamp and base."""
    ch, catalog = item.ch, agent.catalog
    spec = validate.collection(catalog, ch["c"])
    key = validate.record_key(spec, ch["k"])
    rk = record_key(spec.name, key)
    view = work.load_view(rk, spec.name, key)
    f = validate.put_fields(spec, ch["f"]) if ch.get("f") else None
    scope = validate.scope_for_write(spec, key, agent._core.scopes,
                                     evicted.held_scope(work.tx, rk, view) or ch["s"], f or {})
    i = {name: validate.increment(spec, name, inc) for name, inc in (ch.get("i") or {}).items()}
    a = {name: validate.members(spec, name, ms) for name, ms in (ch.get("a") or {}).items()}
    r: dict[str, dict[str, list[str]]] = {}
    for name, rm in (ch.get("r") or {}).items():
        validate.members(spec, name, list(rm))
        r[name] = {m: sorted({moved.get(t) or t for t in tags}) for m, tags in rm.items()}
    result: WriteResult = agent._write(work, spec, rk, key, view, scope, ch["op"],
                                       int(item.entry.get("p", 0)), f=f, i=i, a=a, r=r,
                                       keep=(ch["h"], ch["b"]))
    _keep_created(work, result, item.entry.get("t"))
    return result


def _keep_created(work: Work, result: WriteResult, created: Any) -> None:
    """The outbox entry keeps the time the app wrote the change (its pending age)."""
    if result.n is None or not isinstance(created, int):
        return
    entry = work.outbox_entry(result.n)
    if entry is not None:
        entry["t"] = created
        work.tx.put("outbox", n_key(result.n), entry)


__all__ = ["Report", "SalvageFailed", "SalvageInputError", "read_old", "salvage",
           "source_dir"]
