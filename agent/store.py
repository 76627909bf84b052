"""The agent's LMDB adapter: one environment, named databases, one durable commit per call.

The environment lives in ``<data_dir>/agent.lmdb`` and is opened with ``sync=True``: a
`write()` that returned is on disk (it survives kill -9 and power loss). LMDB is
multi-process: apps, the CLI and the daemon open the same files, and write
transactions are serialised by LMDB's lock file, so read-modify-writes inside one
`write()` are atomic across processes.

Databases (keys are bytes; values orjson unless noted; a record is addressed by
``collection + b"\\0" + key`` in UTF-8, which sorts records by collection then key):

==============  ==============================  ==========================================
database        key                             value
==============  ==============================  ==========================================
view            record                          the local view (`agent.view.ViewState`)
base            record                          the authoritative base (`BaseRecord`) with
                                                per-field versions, without stamps
stamps          record                          field -> full HLC stamp of the base values
outbox          n (8 bytes, big-endian)         {"ch": wire change, "sv", "t" (created ms),
                                                "p" (priority), "at" (attempts), "err",
                                                "x"?: [first n, count] of its transaction
                                                (agent.transaction; optional, format 2)}
outbox_idx      b"P" + (2^31-1-priority) (4 B,  b"" -- drain order: priority high first,
                big-endian) + n (8 B)           then n
                b"R" + record + b"\\0" + n (8 B) b"" -- pending changes of one record
checkpoints     scope (UTF-8)                   `ScopeCheckpoint` doc
conflicts       b"L" + n (8 B) + field          an own write that lost (kept for people)
                b"O" + record + b"\\0" + field  an open manual conflict on a held record
deadletters     n (8 B)                         {"n", "code", "reason", "t", "entry"}
meta            name (ASCII)                    see `agent.core.META_*`
feed            local seq (8 B)                 [collection, key, kind(, data)]; newest ~10,000
index           index id (4 B) + encoded        0x00 / 0x01 (deleted) + record key: one
                field values + record key       entry of a declared index (agent.query)
evicted         record                          {"s", "q", "t"}: a record evicted by
                                                retention (agent.evicted, agent.evict)
fetch           record                          {"t", "sent"?, "req"?}: a record asked
                                                back from the server (agent.fetching)
fetchq          request id (ASCII, sorts by     {"c", "w", "lim", "after", "state", ...}:
                creation time)                  a query asked of the server
                                                (agent.fetch_queries); its filter values
                                                are plain text, like index entries
journal         n (8 bytes, big-endian)         {"e": outbox entry, "s", "q", "a" (acked
                                                ms)}: an acked change (agent.journal)
idem            sha256(app NUL idempotency      {"m", "p", "b", "s", "a", "t"}: a local API
                key) (32 B)                     write's key and its answer
                                                (agent.idempotency)
idem_t          t ms (8 B) + the idem key       b"" -- the keys oldest first, for pruning
idem_a          app tag + t ms + the idem key   b"" -- each app's keys oldest first
idem_c          app tag (8 B)                   keys the app holds (8 B, big-endian)
==============  ==============================  ==========================================

Encryption at rest (`agent.crypto`): when a key is configured, the *values* of view,
base, stamps, outbox, deadletters, conflicts, journal and idem are AES-256-GCM sealed.
Keys stay plain text in every database (collection names, record keys and change
numbers are visible to someone holding the file; idempotency keys are hashed), as do
checkpoints, the feed and meta -- and the index
entries, whose keys hold the values of the indexed fields in plain text (index only
fields that may be read from the file, or do without indexes on encrypted devices).
Encryption is switched on or off for an existing store by `agent.atrest` (`waystation
agent encrypt` / `decrypt`); while one runs (or after one was cut short) a sentinel file
makes `Store.open` refuse the store (`ConversionPending`).

The on-disk format (its version, migrations from older ones, the check of format and
encryption key when a store opens) is `agent.store_format`; the typed transaction is
`agent.store_tx`.

Growth: the map starts at storage.map_size_mb; a transaction that hits MDB_MAP_FULL is
aborted, the map doubled (up to storage.max_map_size_mb) and the transaction re-run.
Another process's growth (MDB_MAP_RESIZED) is adopted and the transaction re-run. A
full disk (ENOSPC) or the size limit raises `StorageFullError`; the aborted transaction
leaves everything stored before intact.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import lmdb
import orjson

from agent.crypto import ValueCipher
from agent.errors import (
    AgentNotInitialised,
    ConversionPending,
    EncryptionKeyError,
    StorageError,
    StorageFullError,
    StoreDamaged,
    StoreNeedsWrite,
)
from agent.groupcommit import GroupCommit, GroupStats, Job
from agent.keyring import KeyEncryptionKey, data_cipher
from agent.store_damage import check_after_open, check_before_open, damage_from, verify
from agent.store_format import FORMAT_VERSION, check_format
from agent.store_tx import ENCRYPTED_DBS, Tx, ValueUnreadable
from waystation.atrest import files as atrest_files
from waystation.diskfull import is_disk_full

T = TypeVar("T")

ENV_DIRNAME = "agent.lmdb"
DB_NAMES = ("view", "base", "stamps", "outbox", "outbox_idx", "checkpoints", "conflicts",
            "deadletters", "meta", "feed", "index", "evicted", "fetch", "fetchq", "journal",
            "idem", "idem_t", "idem_a", "idem_c")
_MAX_RETRIES = 64
_MIB = 1 << 20


def _check_writes_nothing(env: lmdb.Environment, env_dir: Path) -> None:
    """StoreNeedsWrite unless the store can be opened without a write: every database
    of this version exists and the on-disk format is this version's (a read-only LMDB
    environment cannot create a database or migrate)."""
    with env.begin(write=False) as txn:
        held = {bytes(key) for key in txn.cursor().iternext(keys=True, values=False)}
        missing = [name for name in DB_NAMES if name.encode() not in held]
        fmt = None
        if not missing:
            raw = txn.get(b"format", db=env.open_db(b"meta", txn=txn, create=False))
            fmt = None if raw is None else orjson.loads(raw)
    if missing or fmt != FORMAT_VERSION:
        raise StoreNeedsWrite(
            f"the local store at {env_dir} needs a write before it can be read "
            f"({'databases ' + ', '.join(missing) if missing else f'format {fmt}'})")


def record_key(collection: str, key: str) -> bytes:
    """The LMDB key of record (collection, key)."""
    return collection.encode() + b"\0" + key.encode()


def split_record_key(raw: bytes) -> tuple[str, str]:
    c, _, k = raw.partition(b"\0")
    return c.decode(), k.decode()


def n_key(n: int) -> bytes:
    return n.to_bytes(8, "big")


_LOCK_RESERVE_BYTES = 64 * 1024
"""Disk blocks reserved for LMDB's lock file before opening (it needs ~8 KiB for the
default 126 reader slots)."""


def _reserve_lock_file(env_dir: Path) -> None:
    """Allocate the lock file's blocks before LMDB maps it. LMDB sizes lock.mdb with
    ftruncate (a sparse file) and writes it through a shared memory map: on a full disk
    the first write to an unallocated page kills the process with SIGBUS instead of
    returning an error. Allocated here, a full disk is a StorageFullError."""
    try:
        fd = os.open(env_dir / "lock.mdb", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise StorageFullError(str(env_dir)) from None
        return  # LMDB reports whatever else is wrong when it opens the file
    try:
        if os.fstat(fd).st_size < _LOCK_RESERVE_BYTES:
            os.posix_fallocate(fd, 0, _LOCK_RESERVE_BYTES)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise StorageFullError(str(env_dir)) from None
        # a filesystem without fallocate (EOPNOTSUPP): nothing reserved, as before
    finally:
        os.close(fd)


@dataclass
class _Entry:
    store: Store
    refs: int
    pid: int


_registry: dict[str, _Entry] = {}
_registry_lock = threading.Lock()


class Store:
    """An open agent environment. Use `Store.open`; one instance per process and path.

    LMDB forbids opening the same environment twice in one process, so `open` hands out
    the same instance (reference counted) to every opener in this process.
    """

    def __init__(self, path: Path, env: lmdb.Environment, cipher: ValueCipher | None,
                 max_map_size: int, registry_key: str,
                 kek: KeyEncryptionKey | None = None) -> None:
        self.path = path
        self._env = env
        self._cipher = cipher
        self.kek = kek
        self._entry: _Entry | None = None
        self._max_map_size = max_map_size
        self._registry_key = registry_key
        self._lock = threading.RLock()
        self._local = threading.local()
        self._dbs: dict[str, Any] = {}
        self._group = GroupCommit(self._run_group)
        self.closed = False
        self.damaged: StoreDamaged | None = None
        """Set when a read or write met damage: every later write is refused with it."""

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, data_dir: Path, *, map_size_mb: int = 64, max_map_size_mb: int = 4096,
             kek: KeyEncryptionKey | None = None, create: bool = True,
             readonly: bool = False) -> Store:
        """Open (or create) the environment under `data_dir`, encrypted when `kek` (the
        operator's key, `agent.keyring`) is given."""
        env_dir = Path(data_dir) / ENV_DIRNAME
        check_before_open(env_dir)  # a damaged data.mdb is refused, never taken for new
        new_store = not (env_dir / "data.mdb").exists()
        if new_store:
            if not create or readonly:
                # The CLI adds what to do (`agent.cli._open`): whether a --config was
                # given decides the hint.
                raise AgentNotInitialised(
                    f"no local store at {env_dir}: nothing has been written on this device "
                    "yet")
            try:
                env_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise StorageFullError(str(env_dir)) from None
                raise StorageError(f"cannot create the local store directory {env_dir}: "
                                   f"{exc.strerror or exc}") from None
        op = None if new_store else atrest_files.pending(env_dir)
        if op is not None:
            raise ConversionPending(
                f"the local store at {env_dir} is half-way through `waystation agent {op}` "
                f"(interrupted, or running now): run `waystation agent {op}` again to finish "
                "it; no data is lost")
        # A read-only environment is one of its own: it never takes LMDB's writer lock.
        reg_key = os.path.realpath(env_dir) + ("#readonly" if readonly else "")
        with _registry_lock:
            entry = _registry.get(reg_key)
            if entry is not None and entry.pid == os.getpid() and not entry.store.closed:
                theirs = entry.store.kek.fingerprint if entry.store.kek else None
                mine = kek.fingerprint if kek else None
                if theirs != mine:
                    raise EncryptionKeyError(
                        f"the local store at {env_dir} is already open in this process with "
                        "a different encryption setting")
                entry.refs += 1
                return entry.store
            cipher = None if kek is None else data_cipher(env_dir, kek, new_store=new_store)
            store = cls._open_env(env_dir, map_size_mb, max_map_size_mb, cipher, reg_key,
                                  readonly)
            store.kek = kek
            store._entry = _registry[reg_key] = _Entry(store, 1, os.getpid())
            return store

    @classmethod
    def _open_env(cls, env_dir: Path, map_size_mb: int, max_map_size_mb: int,
                  cipher: ValueCipher | None, reg_key: str, readonly: bool = False) -> Store:
        _reserve_lock_file(env_dir)
        try:
            env = lmdb.open(str(env_dir), map_size=map_size_mb * _MIB, subdir=True,
                            max_dbs=len(DB_NAMES) + 2, sync=True, metasync=False,
                            mode=0o600, readonly=readonly)
        except lmdb.Error as exc:
            if is_disk_full(exc, env_dir):
                raise StorageFullError(str(env_dir)) from None
            damaged = damage_from(exc, env_dir)
            if damaged is not None:
                raise damaged from None
            raise StorageError(f"cannot open the local store at {env_dir}: {exc}") from None
        store = cls(env_dir, env, cipher, max(max_map_size_mb, map_size_mb) * _MIB, reg_key)
        try:
            check_after_open(env, env_dir)  # before any page past the header is read
            env.reader_check()  # clear reader slots of killed processes
            if readonly:
                store._retry(partial(_check_writes_nothing, env, env_dir))
            for name in DB_NAMES:
                store._dbs[name] = store._retry(partial(env.open_db, name.encode()))
            # Read-only: checked, never stamped or migrated (the daemon does that).
            (store.read if readonly else store.write)(
                partial(check_format, path=env_dir, cipher=cipher))
        except BaseException:
            env.close()
            store.closed = True
            raise
        return store

    @property
    def encrypted(self) -> bool:
        return self._cipher is not None

    # ------------------------------------------------------------ transactions

    def read(self, fn: Callable[[Tx], T]) -> T:
        """Run `fn` in a read-only snapshot.

        Another process (the CLI beside the daemon) may have grown the map past this
        process's mapping: LMDB then refuses to *begin* a transaction (MDB_MAP_RESIZED,
        returned by no other call), and the new size is adopted before trying again.
        """
        self._check_open()
        for _ in range(_MAX_RETRIES):
            with self._lock:
                try:
                    txn = self._env.begin(write=False)
                except lmdb.MapResizedError:
                    self._env.set_mapsize(0)
                    continue
                except lmdb.Error as exc:
                    raise self._storage_error(exc) from None
                try:
                    return fn(Tx(self._dbs, self._cipher, txn, False))
                except lmdb.Error as exc:
                    raise self._storage_error(exc) from None
                except ValueUnreadable as exc:
                    raise self._unreadable(exc) from None
                finally:
                    txn.abort()
        raise StorageError(f"the local store at {self.path} keeps being resized by another "
                           "process; try again")

    def _flush(self) -> None:
        """Make every commit so far durable (the meta page included)."""
        try:
            self._env.sync(True)
        except lmdb.Error as exc:
            raise self._storage_error(exc) from None

    def write(self, fn: Callable[[Tx], T], *, durable: bool = True) -> T:
        """Run `fn` in one write transaction and commit it; return its result.

        The environment runs with metasync off (MDB_NOMETASYNC): every commit flushes its
        data pages, so the store never loses integrity, but a power loss may undo the
        LAST commit. A `durable` commit (every local write) is therefore followed by a
        flush of the meta page: when it returns, it survives power loss. Replayable
        commits (applying an ack, a delta, a page: the server sends them again) skip
        that second flush — half the cost on the sync path.

        Writes of several threads that arrive together share one commit and one flush
        (`agent.groupcommit`); each runs in a nested transaction of its own, so an
        exception from `fn` undoes its write alone. A write that finds no other under
        way runs at once.

        `fn` may run more than once (after the map grew), and in another thread of this
        process: it must not have effects outside the transaction. An exception from
        `fn` aborts its write. A map grown by another process is met when the
        transaction begins, as in `read`.
        """
        self._check_open()
        if self.damaged is not None:
            raise self.damaged
        if getattr(self._local, "writing", False):
            raise RuntimeError("nested write transaction on the agent store (would deadlock)")
        result: T = self._group.submit(fn, durable)
        return result

    def _run_group(self, jobs: list[Job]) -> Callable[[], None] | None:
        """One LMDB transaction for `jobs` (agent.groupcommit): commit, and return the
        flush still owed (durable jobs), or None."""
        for _ in range(_MAX_RETRIES):
            with self._lock:
                self._local.writing = True
                try:
                    try:
                        txn = self._env.begin(write=True)
                    except lmdb.MapResizedError:
                        self._env.set_mapsize(0)
                        continue
                    try:
                        if len(jobs) == 1:
                            jobs[0].result = self._run_one(jobs[0], txn)
                        else:
                            for job in jobs:
                                self._run_nested(job, txn)
                        txn.commit()
                    except lmdb.MapFullError:
                        _abort(txn)
                        self._grow()
                        for job in jobs:
                            job.result = job.error = None
                        continue
                    except lmdb.Error as exc:
                        _abort(txn)
                        raise self._storage_error(exc) from None
                    except BaseException as exc:
                        _abort(txn)
                        if len(jobs) != 1:
                            raise
                        jobs[0].error = (self._unreadable(exc)
                                         if isinstance(exc, ValueUnreadable) else exc)
                        return None
                finally:
                    self._local.writing = False
            if any(job.durable and job.error is None for job in jobs):
                return self._flush
            return None
        raise StorageError(f"the local store at {self.path} keeps being resized by another "
                           "process; nothing was written, try again")

    def _run_one(self, job: Job, txn: lmdb.Transaction[bytes]) -> Any:
        return job.fn(Tx(self._dbs, self._cipher, txn, True))

    def _run_nested(self, job: Job, parent: lmdb.Transaction[bytes]) -> None:
        """One job of a group in a nested transaction: its error undoes it alone (a
        full map aborts the whole group, which is run again in a larger map)."""
        child = self._env.begin(write=True, parent=parent)
        try:
            job.result = job.fn(Tx(self._dbs, self._cipher, child, True))
            child.commit()
        except lmdb.MapFullError:
            _abort(child)
            raise
        except lmdb.Error as exc:
            _abort(child)
            job.error = self._storage_error(exc)
        except BaseException as exc:
            _abort(child)
            job.error = self._unreadable(exc) if isinstance(exc, ValueUnreadable) else exc

    def _retry(self, fn: Callable[[], T]) -> T:
        for _ in range(_MAX_RETRIES):
            try:
                return fn()
            except lmdb.MapFullError:
                self._grow()
            except lmdb.MapResizedError:
                self._env.set_mapsize(0)
            except lmdb.Error as exc:
                raise self._storage_error(exc) from None
        raise StorageError(f"the local store at {self.path} could not be opened")

    def _grow(self) -> None:
        current = int(self._env.info()["map_size"])
        if current >= self._max_map_size:
            raise StorageFullError(str(self.path), map_limit_mb=self._max_map_size // _MIB)
        new = min(max(current * 2, current + _MIB), self._max_map_size)
        try:
            self._env.set_mapsize(new)
        except lmdb.Error as exc:
            raise self._storage_error(exc) from None

    def _storage_error(self, exc: lmdb.Error) -> StorageError:
        if is_disk_full(exc, self.path):
            return StorageFullError(str(self.path))
        damaged = damage_from(exc, self.path)
        if damaged is not None:
            # Writing on into a damaged tree can only spread the damage: stop writes.
            self.damaged = self.damaged or damaged
            return self.damaged
        return StorageError(f"the local store at {self.path} failed: {exc}")

    def _unreadable(self, exc: ValueUnreadable) -> StoreDamaged:
        """A stored value that does not decode: the page holding it is damaged."""
        self.damaged = self.damaged or StoreDamaged(str(self.path / "data.mdb"),
                                                    f"is damaged ({exc})")
        return self.damaged

    def _check_open(self) -> None:
        if self.closed:
            raise StorageError(f"the local store at {self.path} is closed")

    def verify(self) -> None:
        """Walk every database's pages once (`agent.store_damage.verify`, in a child
        process): the agent service runs this when it starts, so damage is refused
        before it serves."""
        self._check_open()
        verify(self.path, DB_NAMES)

    # ------------------------------------------------------------------ status

    @property
    def group_stats(self) -> GroupStats:
        """Commits shared by concurrent writers (agent.groupcommit)."""
        return self._group.stats

    def map_size(self) -> int:
        return int(self._env.info()["map_size"])

    def used_bytes(self) -> int:
        info = self._env.info()
        return (int(info["last_pgno"]) + 1) * int(self._env.stat()["psize"])

    def detach(self) -> None:
        """Stop handing this instance to new openers in this process (the store's files
        are about to be replaced: a remote wipe); current holders keep it until they
        close it."""
        with _registry_lock:
            if self._entry is not None and _registry.get(self._registry_key) is self._entry:
                del _registry[self._registry_key]

    def close(self) -> None:
        """Release this opener's reference; the environment closes with the last one."""
        with _registry_lock:
            entry = self._entry
            if entry is not None:
                entry.refs -= 1
                if entry.refs > 0:
                    return
                if _registry.get(self._registry_key) is entry:
                    del _registry[self._registry_key]
            if not self.closed:
                self.closed = True
                with self._lock:
                    self._env.close()


def _abort(txn: lmdb.Transaction[bytes]) -> None:
    with contextlib.suppress(lmdb.Error):
        txn.abort()


__all__ = [
    "DB_NAMES",
    "ENCRYPTED_DBS",
    "ENV_DIRNAME",
    "FORMAT_VERSION",
    "Store",
    "Tx",
    "n_key",
    "record_key",
    "split_record_key",
]
