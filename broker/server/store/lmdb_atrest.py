"""Turning encryption at rest on and off for an existing LMDB server store, and changing
its key: `waystation server encrypt | decrypt | rekey`, with the server stopped.

The same steps as on the devices (`agent.atrest`; the batches and their progress marker
in `waystation.atrest.rewrite`): a sentinel file makes every `LmdbStore` refuse to open
until the conversion ends; encrypt wraps a new data key into ``dek.new``, commits the
marker, converts the sealed tables (`lmdb_sealed.SEALED`) batch by batch, renames
``dek.new`` to ``dek``, commits the check token with the marker's removal, compacts the
file (the freed pages held the plain values) and removes the sentinel; decrypt does the
reverse and shreds the data key. A crash (kill -9, power loss) anywhere leaves every
value readable by the conversion, which the same command resumes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import lmdb

from agent.crypto import ValueCipher
from agent.keyring import KeyEncryptionKey, shred
from broker.errors import StoreError, StoreKeyError
from broker.server.store import lmdb_keys
from broker.server.store.base import STORE_FORMAT
from broker.server.store.lmdb_keys import DEK_FILE, NEW_DEK_FILE
from broker.server.store.lmdb_sealed import SEALED
from broker.server.store.lmdb_txn import DBS
from waystation.atrest import files, rewrite
from waystation.atrest.outcome import Outcome
from waystation.atrest.rawenv import RawEnv

MARKER = b"atrest"
_NAMES = tuple(n for n in DBS if n in SEALED)
_FORMATS = {str(v).encode() for v in range(1, STORE_FORMAT + 1)}


def _pending(store_dir: Path, op: str) -> StoreError:
    return StoreError(
        f"the server store at {store_dir} is half-way through `waystation server {op}`: "
        f"run `waystation server {op}` again to finish it; no data is lost")


@contextlib.contextmanager
def _exclusive(data_dir: Path, max_map_size_mb: int) -> Iterator[RawEnv]:
    raw = RawEnv(Path(data_dir) / "store", DBS, meta_db="meta", marker_key=MARKER,
                 max_map_size=max_map_size_mb << 20, fail=StoreError, what="server store")
    try:
        raw.refuse_if_shared("the server (systemctl stop waystation-server) and every "
                             "`waystation server/device` command using the store")
        fmt = raw.meta_raw(b"format")
        # Older formats differ in tables that are never sealed (the login removals of
        # format 1): converted as they are, and migrated when the store next opens.
        if fmt is not None and fmt not in _FORMATS:
            raise StoreError(f"the server store at {raw.env_dir} has format "
                             f"{fmt.decode(errors='replace')}; this version converts formats "
                             f"up to {STORE_FORMAT}: run the matching version")
        yield raw
    finally:
        raw.close()


def _old_cipher(raw: RawEnv, kek: KeyEncryptionKey) -> ValueCipher | None:
    token = raw.meta_raw(b"enc")
    if token is None:
        return None
    cipher = lmdb_keys.data_key(raw.env_dir, kek)
    lmdb_keys.check(cipher, token, raw.env_dir)
    return cipher


def _finish(raw: RawEnv, enc: str | None) -> None:
    def run(txn: lmdb.Transaction[bytes]) -> None:
        meta = raw.dbs["meta"]
        if enc is None:
            txn.delete(b"enc", db=meta)
        else:
            txn.put(b"enc", enc.encode(), db=meta)
        txn.delete(MARKER, db=meta)
    rewrite.write(raw.target, run)


def encrypt(data_dir: Path, kek: KeyEncryptionKey, *, max_map_size_mb: int = 65536,
            batch: int = 1000) -> Outcome:
    """Encrypt the server store under `data_dir` (or finish an interrupted encrypt)."""
    with _exclusive(data_dir, max_map_size_mb) as raw:
        store_dir = raw.env_dir
        marker = rewrite.read_marker(raw.target)
        if marker is not None and marker.get("to") != "envelope":
            raise _pending(store_dir, "decrypt")
        resumed = marker is not None or files.pending(store_dir) is not None
        if marker is None:
            old = _old_cipher(raw, kek)
            if old is not None:
                if files.pending(store_dir) is not None:
                    raw.compact()  # an encrypt that stopped after its last commit
                    files.clear_pending(store_dir)
                return Outcome("encrypt", str(store_dir), "envelope", "envelope", False,
                               resumed, 0, str(store_dir / DEK_FILE),
                               "the server store is encrypted already; nothing to do")
            files.mark_pending(store_dir, "encrypt")
            new = lmdb_keys.create_data_key(store_dir, kek, NEW_DEK_FILE)
            rewrite.kill_point("dek")
            rewrite.start(raw.target, {"from": "plain", "to": "envelope",
                                       "check": new.check_token().hex()})
            rewrite.kill_point("marker")
        else:
            name = NEW_DEK_FILE if (store_dir / NEW_DEK_FILE).exists() else DEK_FILE
            new = lmdb_keys.data_key(store_dir, kek, name)
            try:
                check = bytes.fromhex(str(marker["check"]))
            except ValueError:
                check = b""  # a damaged marker: nothing verifies
            if not new.verify(check):
                raise StoreKeyError(
                    f"the data key {store_dir / name} is not the one the interrupted "
                    "`waystation server encrypt` started with (was it replaced?): restore "
                    "it, or restore the store from a backup")
        count = rewrite.convert(raw.target, _NAMES, None, new, batch=batch)
        if (store_dir / NEW_DEK_FILE).exists():
            os.replace(store_dir / NEW_DEK_FILE, store_dir / DEK_FILE)
            files.fsync_dir(store_dir)
        rewrite.kill_point("renamed")
        current = rewrite.read_marker(raw.target)
        _finish(raw, None if current is None else str(current["check"]))
        rewrite.kill_point("finished")
        raw.compact()
        files.clear_pending(store_dir)
    return Outcome("encrypt", str(store_dir), "plain", "envelope", True, resumed, count,
                   str(store_dir / DEK_FILE),
                   f"the server store is encrypted ({count} values rewritten"
                   f"{', resumed' if resumed else ''}): set store.encryption_key_file "
                   + ("to a file holding the key you gave on standard input" if kek.streamed
                      else f"= \"{kek.source}\"")
                   + " (or the systemd credential holding it) before starting the server; "
                   "without that key the store cannot be read")


def decrypt(data_dir: Path, kek: KeyEncryptionKey, *, max_map_size_mb: int = 65536,
            batch: int = 1000) -> Outcome:
    """Store the server's values in plain text again; the data key is shredded."""
    with _exclusive(data_dir, max_map_size_mb) as raw:
        store_dir = raw.env_dir
        marker = rewrite.read_marker(raw.target)
        if marker is not None and marker.get("to") != "plain":
            raise _pending(store_dir, "encrypt")
        resumed = marker is not None or files.pending(store_dir) is not None
        old = _old_cipher(raw, kek)
        if marker is None:
            if old is None:
                shred(store_dir)  # a decrypt that stopped after its last commit
                files.clear_pending(store_dir)
                return Outcome("decrypt", str(store_dir), "plain", "plain", False, resumed,
                               0, None, "the server store is not encrypted; nothing to do")
            files.mark_pending(store_dir, "decrypt")
            rewrite.start(raw.target, {"from": "envelope", "to": "plain", "check": None})
            rewrite.kill_point("marker")
        count = rewrite.convert(raw.target, _NAMES, old, None, batch=batch)
        _finish(raw, None)
        rewrite.kill_point("finished")
        shred(store_dir)
        files.clear_pending(store_dir)
    return Outcome("decrypt", str(store_dir), "envelope", "plain", True, resumed, count, None,
                   f"the server store is no longer encrypted ({count} values rewritten): "
                   "remove store.encryption_key_file from the server's config before "
                   "starting it")


def rekey(data_dir: Path, old: KeyEncryptionKey, new: KeyEncryptionKey, *,
          max_map_size_mb: int = 65536) -> Outcome:
    """Wrap the store's data key with `new`: O(1), the store is not rewritten."""
    with _exclusive(data_dir, max_map_size_mb) as raw:
        store_dir = raw.env_dir
        op = files.pending(store_dir)
        if op is not None or rewrite.read_marker(raw.target) is not None:
            raise _pending(store_dir, op or "encrypt")
        if _old_cipher(raw, old) is None:
            raise StoreKeyError(
                f"the server store at {store_dir} is not encrypted: there is no data key "
                "to re-wrap (encrypt it with `waystation server encrypt`)")
        lmdb_keys.rewrap_data_key(store_dir, old, new)
    return Outcome("rekey", str(store_dir), "envelope", "envelope", True, False, 0,
                   str(store_dir / DEK_FILE),
                   f"the data key is now wrapped with {new.named('new')}: point "
                   "store.encryption_key_file (or the systemd credential) at "
                   f"{'a file holding it' if new.streamed else 'it'} before the server "
                   f"starts again; {old.named('old')} no longer opens this store")


__all__ = ["MARKER", "decrypt", "encrypt", "rekey"]
