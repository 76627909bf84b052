"""Reading the old store for `agent salvage` (agent.salvage): which directory, whose
store, its key, and every pending change that still reads -- through LMDB's tree
(agent.salvage_read, in child processes) and, for the change numbers the tree cannot
reach, from the raw pages (agent.salvage_pages). Nothing of the old store is written.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from agent.changes import change_id
from agent.crypto import ValueCipher
from agent.errors import EncryptionKeyError
from agent.keyring import DEK_FILE, KeyEncryptionKey, data_cipher
from agent.salvage_pages import PageScan, scan
from agent.salvage_read import RawRead, read_store
from agent.store import ENV_DIRNAME, n_key
from waystation.errors import ConfigError, WaystationError

_META_KEYS = (b"device", b"inc", b"enc")
_ALL = (1 << 53) - 1



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
    from_pages: bool = False
    """Read from the raw pages, not through the tree (agent.salvage_pages)."""

    @property
    def ch(self) -> dict[str, Any]:
        ch: dict[str, Any] = self.entry["ch"]
        return ch

    def to_dict(self, dev: str) -> dict[str, Any]:
        ch = self.ch
        doc: dict[str, Any] = {"n": self.n, "change_id": change_id(dev, self.n), "op": ch["op"],
                               "collection": ch["c"], "key": ch["k"], "stamp": ch["h"],
                               "created_ms": self.entry.get("t")}
        if self.from_pages:
            doc["from_pages"] = True
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
    pages: int = 0
    """Pages read raw (0: the tree gave everything)."""
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
            "reads": self.reads, "pages_scanned": self.pages}


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


def _cipher(env_dir: Path, tokens: list[str], key_file: Path | None) -> ValueCipher | None:
    """The old store's cipher (None: not encrypted). `tokens`: the encryption check
    tokens its meta gives (several only when read from freed pages too)."""
    sealed_key = (env_dir / DEK_FILE).exists()  # an encrypted store's wrapped data key
    if not tokens and not sealed_key:
        return None
    if key_file is None:
        raise EncryptionKeyError(
            f"the store at {env_dir} is encrypted: give `--key-file PATH`, the key file it "
            "was encrypted with (default: storage.encryption_key_file of the config)")
    kek = KeyEncryptionKey.from_file(key_file, "--key-file")
    cipher = data_cipher(env_dir, kek, new_store=False)
    # Without a token (meta unreadable) each value's AES-GCM tag still proves the key.
    if tokens and not any(cipher.verify(bytes.fromhex(token)) for token in tokens):
        raise EncryptionKeyError(f"the key file {key_file} is not the key the store at "
                                 f"{env_dir} was encrypted with")
    return cipher


def _loads(value: bytes) -> Any:
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError:
        return None


def _identity(raw: RawRead, pages: PageScan | None) -> dict[str, list[Any]]:
    """The old store's device, incarnation and encryption token: from the tree, or
    else every distinct value the pages hold (freed pages keep old versions)."""
    out: dict[str, list[Any]] = {}
    for name in ("device", "inc", "enc"):
        if name in raw.meta:
            value = _loads(raw.meta[name])
            out[name] = [value] if isinstance(value, str) else []
        elif pages is not None:
            found = {_loads(v) for v in pages.meta.get(name, []) if _loads(v) is not None}
            out[name] = sorted(v for v in found if isinstance(v, str))
        else:
            out[name] = []
    return out


def _check(n: int, entry: Any) -> dict[str, Any]:
    """An outbox entry as stored; ValueError when it is not one."""
    ch = entry.get("ch") if isinstance(entry, dict) else None
    if not isinstance(ch, dict) or ch.get("n") != n or ch.get("op") not in ("put", "del") \
            or not all(isinstance(ch.get(m), str) for m in ("h", "c", "k", "s")) \
            or not isinstance(ch.get("b"), int):
        raise ValueError("is not a stored change (damaged bytes)")
    return dict(entry)


def _decode(n: int, value: bytes, cipher: ValueCipher | None) -> dict[str, Any]:
    """One outbox entry read through the tree; ValueError saying why it is unusable."""
    if cipher is not None:
        try:
            value = cipher.open(b"outbox\0" + n_key(n), value)
        except EncryptionKeyError as exc:
            raise ValueError(f"does not decrypt ({exc})") from None
    return _check(n, _loads(value))


def _opener(cipher: ValueCipher | None) -> Callable[[str, int, bytes], bytes | None]:
    def run(db: str, n: int, value: bytes) -> bytes | None:
        if cipher is None:
            return value
        try:
            return cipher.open(db.encode() + b"\0" + n_key(n), value)
        except EncryptionKeyError:
            return None

    return run


def read_old(env_dir: Path, dev: str, key_file: Path | None, dry_run: bool) -> Report:
    """Read the old store: its identity (refusing another device's store) and every
    outbox entry that still reads: through LMDB's tree (agent.salvage_read) and, for
    what the tree cannot reach, from the raw pages (agent.salvage_pages)."""
    raw = read_store(env_dir)
    whole_tree = raw.open_error is None and raw.meta_error is None and not raw.lost
    pages = None if whole_tree else scan(env_dir / "data.mdb", _META_KEYS)
    report = Report(str(env_dir), dry_run, reads=raw.children, lost=raw.lost,
                    meta_error=raw.open_error or raw.meta_error)
    if raw.open_error is not None:
        report.lost = [(1, _ALL)]
    ident = _identity(raw, pages)
    devices = ident["device"]
    if devices and dev not in devices:
        raise SalvageInputError(f"the store at {env_dir} belongs to device "
                                f"{devices[0]!r}, not to this agent's {dev!r}: salvage "
                                "it on that device (or with its agent config)")
    report.device = dev if devices else None
    report.incarnation = ident["inc"][0] if len(ident["inc"]) == 1 else None
    report.encrypted = bool(ident["enc"]) or (env_dir / DEK_FILE).exists()
    cipher = _cipher(env_dir, ident["enc"], key_file)
    for n in sorted(raw.entries):
        try:
            report.items.append(Item(n, _decode(n, raw.entries[n], cipher)))
        except ValueError as exc:
            report.bad.append({"n": n, "reason": f"change {dev}:{n} {exc}"})
    if pages is not None:
        _from_pages(report, pages, cipher, set(raw.entries))
    if raw.open_error is not None and not report.items and not devices:
        raise SalvageFailed(f"LMDB cannot open {env_dir / 'data.mdb'} ({raw.open_error}) "
                            "and none of its pages holds a pending change: nothing in it "
                            "can be salvaged by this command; keep the directory")
    report.items.sort(key=lambda i: i.n)
    return report


def _from_pages(report: Report, pages: PageScan, cipher: ValueCipher | None,
                read: set[int]) -> None:
    """Add the entries of the change numbers the tree could not reach, read from the
    raw pages (where the tree did read, it is right: a copy on a freed page there is an
    entry deleted since)."""
    entries, acked = pages.decode(_opener(cipher))
    for n in sorted(entries):
        if n in read or not any(first <= n <= last for first, last in report.lost):
            continue
        try:
            item = Item(n, _check(n, entries[n]), from_pages=True)
        except ValueError:
            continue
        if n in acked:
            item.state, item.reason = "already_synced", "acked (the old store's journal)"
        report.items.append(item)
    report.pages = pages.pages



__all__ = ["Item", "Report", "SalvageFailed", "SalvageInputError", "read_old", "source_dir"]
