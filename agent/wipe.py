"""Remote wipe of a lost or stolen device's store (PROTOCOL.md §7.9 `wipe`).

The order matters, so that a crash at any point leaves no readable data behind:

1. one durable transaction empties every database and marks the old store *gone*:
   any process that still has it open (an app, the local API) sees it empty, and its
   writes are refused (`StoreGone`), not written into files about to be deleted;
2. the data key is destroyed (crypto-shredding, `agent.keyring.shred`): from here on
   nothing left on disk — old LMDB pages, a copy of the file — can be decrypted. A store
   from before envelope encryption has its key file overwritten with a new key instead
   (its bytes were the data key), when it can be;
3. the store's files are deleted;
4. a new, empty store is created (a new incarnation) that remembers only the device id,
   the executed command ids (the wipe's among them, so it is reported done and never
   run twice) and when the wipe happened.

A crash between 1 and 4 leaves either the emptied old store (and the wipe, not yet
recorded as executed there, runs again when the server sends it again) or no store at
all (the next open creates a fresh one, which runs the wipe again: harmless).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import structlog

from agent.core import Core, Work
from agent.keyring import DEK_FILE, replace_key_file, shred
from agent.store import DB_NAMES, Store

log = structlog.get_logger("waystation.agent")

_STORE_FILES = ("data.mdb", "lock.mdb", DEK_FILE, DEK_FILE + ".tmp", DEK_FILE + ".new",
                DEK_FILE + ".new.tmp")


@dataclass(frozen=True)
class WipeReport:
    """What a wipe did."""

    command_id: str
    at_ms: int
    key_destroyed: bool
    """A data key (or a legacy key file) was destroyed before the files."""
    key_kept: str | None = None
    """Why a legacy key file could not be destroyed, if so."""


def erase(core: Core, command_id: str, legacy_key_file: Path | None) -> tuple[WipeReport,
                                                                               list[str]]:
    """Steps 1-3: empty and mark the old store, destroy its key, delete its files.

    Returns the report and the command ids the new store must remember. The caller
    closes its handle on the old store and opens the new one (`finish`).
    """
    store = core.store
    now = core.now_ms()
    encrypted = store.encrypted

    def empty(work: Work) -> list[str]:
        tx = work.tx
        done: list[str] = list(tx.meta("cmds", []))
        for name in DB_NAMES:
            if name != "meta":
                tx.clear(name)
        for key in list(tx.keys("meta")):
            if key not in (b"format", b"enc", b"device"):
                tx.delete("meta", key)
        tx.set_meta("gone", {"t": now, "id": command_id})
        return done

    done = store.write(lambda tx: empty(Work(core, tx)))
    env_dir = store.path
    key_destroyed = shred(env_dir)
    key_kept = None
    if encrypted and not key_destroyed and legacy_key_file is not None:
        key_destroyed = replace_key_file(legacy_key_file)
        if not key_destroyed:
            key_kept = (f"the key file {legacy_key_file} could not be destroyed (read-only?): "
                        "the store's files are deleted, but whoever holds that key and a "
                        "copy of the old files could read them; destroy it by hand")
    store.detach()
    for name in _STORE_FILES:
        with contextlib.suppress(FileNotFoundError):
            (env_dir / name).unlink()
    if command_id not in done:
        done.append(command_id)
    return WipeReport(command_id, now, key_destroyed, key_kept), done


def finish(new_core: Core, report: WipeReport, done: list[str]) -> None:
    """Step 4, on the freshly created store: remember the executed commands and the wipe."""

    def run(work: Work) -> None:
        work.tx.set_meta("cmds", done[-1000:])
        work.tx.set_meta("wiped", {"t": report.at_ms, "id": report.command_id,
                                   "key_destroyed": report.key_destroyed})

    new_core.write(run)
    log.warning("store_wiped", dev=new_core.dev, command=report.command_id,
                key_destroyed=report.key_destroyed, key_kept=report.key_kept)


def is_gone(store: Store) -> bool:
    """True when this open store was wiped (its files replaced by a new store)."""
    return bool(store.read(lambda tx: tx.meta("gone")))


__all__ = ["WipeReport", "erase", "finish", "is_gone"]
