"""The embedded LMDB store (the single-server default).

One LMDB environment in ``{data_dir}/store`` with one named database per table (layout
in `broker.server.store.lmdb_txn`), opened with ``sync=True``: a committed transaction is on
disk. The map grows on demand (doubling, up to ``max_map_size_mb``), as a long-running
server needs; another process that grew it (the operator CLI) is followed
transparently. The layout's format version is kept in the ``meta`` table and checked on
open; an older format is migrated in the opening transaction (`_MIGRATIONS`).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import lmdb

from agent.crypto import ValueCipher
from agent.keyring import KeyEncryptionKey
from broker.errors import StoreError, StoreFormatError, StoreFullError, StoreKeyError
from broker.server.store import lmdb_keys, lmdb_removals
from broker.server.store.base import (
    STORE_FORMAT,
    DeadLetterLimits,
    ReadTxn,
    StoreInfo,
    WriteTxn,
)
from broker.server.store.lmdb_sealed import SEALED, SealedTxn
from broker.server.store.lmdb_txn import DBS, DEFAULT_MAX_DEAD_LETTERS, LmdbReadTxn, LmdbWriteTxn
from waystation.atrest import files as atrest_files
from waystation.diskfull import is_disk_full

T = TypeVar("T")
_MB = 1024 * 1024
_MIGRATIONS: dict[int, Callable[[Any, dict[str, Any]], object]] = {
    1: lmdb_removals.migrate_1_to_2}
"""Format n -> n + 1 (`base.STORE_FORMAT`), run in the transaction that opens the store."""


class LmdbStore:
    """The store in one LMDB environment (see module docstring)."""

    kind = "lmdb"
    interruptible = False
    """`interrupt` is a no-op: see there."""

    def __init__(self, data_dir: str | os.PathLike[str], *, map_size_mb: int = 256,
                 max_map_size_mb: int = 65536,
                 max_dead_letters: int | None = None,
                 dead_letters: DeadLetterLimits | None = None,
                 kek: KeyEncryptionKey | None = None) -> None:
        self.path = Path(data_dir) / "store"
        op = atrest_files.pending(self.path)
        if op is not None:
            raise StoreError(
                f"the server store at {self.path} is half-way through `waystation server "
                f"{op}` (interrupted, or running now): run `waystation server {op}` again "
                "to finish it; no data is lost")
        self.kek = kek
        self._cipher: ValueCipher | None = None
        self._sealed: dict[int, str] = {}
        self._max_map = max_map_size_mb * _MB
        limits = dead_letters or DeadLetterLimits()
        if max_dead_letters is not None:
            limits = dataclasses.replace(limits, max_count=max_dead_letters)
        self.dead_letter_limits = limits
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._env = lmdb.open(str(self.path), map_size=map_size_mb * _MB,
                                  max_dbs=len(DBS) + 2, sync=True, metasync=True,
                                  readahead=False, max_readers=256)
        except (OSError, lmdb.Error) as exc:
            raise StoreError(f"cannot open the server store at {self.path}: {exc} "
                             "(check that the directory exists and is writable, and "
                             "that no other version of Waystation uses it)") from None
        try:
            self._dbs = {name: self._env.open_db(name.encode()) for name in DBS}
            new_store = self._open_cipher(kek)
            self._check_format(new_store)
        except BaseException:
            self._env.close()
            raise

    def _open_cipher(self, kek: KeyEncryptionKey | None) -> bool:
        """Set up encryption at rest (`lmdb_keys`); True for a new store."""
        with self._env.begin(db=self._dbs["meta"]) as txn:
            new_store = txn.get(b"format") is None
            token = txn.get(b"enc")
        if kek is None:
            if token is not None:
                raise StoreKeyError(
                    f"the server store at {self.path} is encrypted: set "
                    "store.encryption_key_file to the key file it was encrypted with")
            return new_store
        if new_store:
            cipher = lmdb_keys.create_data_key(self.path, kek)
        elif token is None:
            raise StoreKeyError(
                f"the server store at {self.path} is not encrypted: stop the server and run "
                "`waystation server encrypt` to encrypt it, or remove "
                "store.encryption_key_file")
        else:
            cipher = lmdb_keys.data_key(self.path, kek)
            lmdb_keys.check(cipher, bytes(token), self.path)
        self._cipher = cipher
        self._sealed = {id(self._dbs[name]): name for name in SEALED}
        return new_store

    @property
    def encrypted(self) -> bool:
        return self._cipher is not None

    def _wrap(self, txn: lmdb.Transaction[bytes]) -> Any:
        if self._cipher is None:
            return txn
        return SealedTxn(txn, self._sealed, self._cipher)

    def _check_format(self, new_store: bool) -> None:
        def check(txn: WriteTxn) -> None:
            assert isinstance(txn, LmdbWriteTxn)
            raw = txn._txn.get(b"format", db=self._dbs["meta"])
            if raw is None:
                txn._txn.put(b"format", str(STORE_FORMAT).encode(), db=self._dbs["meta"])
                if new_store and self._cipher is not None:
                    txn._txn.put(b"enc", self._cipher.check_token().hex().encode(),
                                 db=self._dbs["meta"])
                return
            version = int(raw) if raw.isdigit() else -1
            if not 1 <= version <= STORE_FORMAT:
                raise StoreFormatError(
                    f"the server store at {self.path} has format {raw.decode(errors='replace')}, "
                    f"this version of Waystation reads format {STORE_FORMAT}: run the matching "
                    "version, or move the directory away to start an empty store")
            while version < STORE_FORMAT:  # older formats migrate in this transaction
                _MIGRATIONS[version](txn._txn, self._dbs)
                version += 1
                txn._txn.put(b"format", str(version).encode(), db=self._dbs["meta"])
        self.transact(check)

    # --- transactions

    @contextmanager
    def read(self) -> Iterator[ReadTxn]:
        txn = self._begin(write=False)
        try:
            yield LmdbReadTxn(self._wrap(txn), self._dbs)
        finally:
            txn.abort()

    def transact(self, fn: Callable[[WriteTxn], T]) -> T:
        while True:
            txn = self._begin(write=True)
            try:
                wtxn = LmdbWriteTxn(self._wrap(txn), self._dbs, self.dead_letter_limits)
                result = fn(wtxn)
                wtxn.finish()
                txn.commit()
                return result
            except lmdb.MapFullError:
                txn.abort()
                self._grow()
            except lmdb.Error as exc:
                txn.abort()
                if is_disk_full(exc, self.path):
                    raise StoreFullError(
                        f"the disk holding the server store at {self.path} is full ({exc}): "
                        "free disk space; nothing of this transaction was written, and "
                        "devices resend what was not acked") from exc
                raise StoreError(f"the server store at {self.path} failed: {exc}") from exc
            except BaseException:
                txn.abort()
                raise

    def _begin(self, *, write: bool) -> lmdb.Transaction[bytes]:
        for _ in range(3):
            try:
                return self._env.begin(write=write, buffers=False)
            except lmdb.MapResizedError:
                # another process (the CLI, or a sibling) grew the map: adopt its size
                self._env.set_mapsize(0)
            except lmdb.Error as exc:
                raise StoreError(f"the server store at {self.path} failed: {exc}") from exc
        raise StoreError(f"the server store at {self.path} keeps being resized; retry")

    def _grow(self) -> None:
        current = int(self._env.info()["map_size"])
        if current >= self._max_map:
            raise StoreFullError(
                f"the server store at {self.path} is full ({current // _MB} MiB = "
                "store.max_map_size_mb): raise store.max_map_size_mb, purge old data, "
                "or free disk space")
        self._env.set_mapsize(min(current * 2, self._max_map))

    # --- information

    def info(self) -> StoreInfo:
        with self.read() as txn:
            counts = txn.counts()
        info = self._env.info()
        try:
            size = (self.path / "data.mdb").stat().st_size
        except OSError:
            size = 0
        used = int(self._env.stat()["psize"]) * (int(info["last_pgno"]) + 1)
        return StoreInfo(kind=self.kind, location=str(self.path), size_bytes=min(size, used)
                         if size else used, capacity_bytes=int(info["map_size"]),
                         counts=counts)

    def backup(self, dest_dir: str | os.PathLike[str]) -> Path:
        """Write a consistent, compacted copy of the store into `dest_dir` (which must
        not exist yet), laid out as a server data directory: a server whose `data_dir`
        is `dest_dir` opens it. Safe while the server runs: the copy is one read
        transaction's snapshot. Returns the copied data file."""
        dest = Path(dest_dir)
        if dest.exists():
            raise StoreError(f"backup destination {dest} exists already: name a new "
                             "directory (a backup never overwrites anything)")
        target = dest / self.path.name
        try:
            target.mkdir(parents=True, mode=0o700)
            if self._cipher is not None:  # the values are sealed with it: it goes along
                shutil.copyfile(self.path / lmdb_keys.DEK_FILE, target / lmdb_keys.DEK_FILE)
            self._env.copy(str(target), compact=True)
        except (OSError, lmdb.Error) as exc:
            raise StoreError(f"cannot write the backup to {target}: {exc} (check that the "
                             "parent directory exists, is writable and has room)") from None
        return target / "data.mdb"

    def interrupt(self) -> None:
        """A no-op (`Store.interrupt`): an LMDB call waits on no network and a write
        waits for another process's write transaction only as long as that one runs, so
        there is nothing to end; the store keeps working, and a stopping server still
        writes its last flush through it."""

    def close(self) -> None:
        self._env.close()

    def __enter__(self) -> LmdbStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["DEFAULT_MAX_DEAD_LETTERS", "LmdbReadTxn", "LmdbStore", "LmdbWriteTxn"]



def restore_backup(backup_dir: str | os.PathLike[str], data_dir: str | os.PathLike[str],
                   **store_options: Any) -> LmdbStore:
    """Put the backup written by `LmdbStore.backup` into `data_dir`, whose store must not
    exist (the operator moves the old one aside, with the server stopped); returns it
    open. The caller then moves its sequences on (`broker.server.operations.after_restore`)."""
    src = Path(backup_dir) / "store" / "data.mdb"
    if not src.is_file():
        raise StoreError(f"{backup_dir} is not a Waystation backup (no store/data.mdb in it; "
                         "make one with `waystation server backup DEST`)")
    target = Path(data_dir) / "store"
    if target.exists():
        raise StoreError(f"a store exists at {target}: stop the server and move that "
                         "directory aside first (a restore never overwrites a store)")
    try:
        target.mkdir(parents=True, mode=0o700)
        dek = src.parent / lmdb_keys.DEK_FILE
        if dek.exists():
            shutil.copyfile(dek, target / lmdb_keys.DEK_FILE)
        shutil.copyfile(src, target / "data.mdb")
    except OSError as exc:
        raise StoreError(f"cannot copy the backup into {target}: {exc}") from None
    return LmdbStore(data_dir, **store_options)




