"""Turning encryption at rest on and off for an existing store, and changing its key.

    waystation agent encrypt   plain store        -> envelope encryption (a new data key)
                               legacy store       -> envelope encryption (values re-sealed)
    waystation agent decrypt   encrypted store    -> plain store (the data key shredded)
    waystation agent rekey     the data key re-wrapped with a new key file: O(1)

`encrypt` and `decrypt` rewrite every value of the encrypted databases
(`agent.store.ENCRYPTED_DBS`) in batches, each batch one LMDB transaction that also
moves the progress marker (`waystation.atrest.rewrite`), so a crash at any point leaves
a store whose every value is readable and a conversion that the same command resumes.
The steps, in the order that keeps that true:

1. the service lock is taken (no daemon may start) and no other process may have the
   store open; a sentinel file is written: every `Store.open` refuses until step 5;
2. encrypt: a new data key is wrapped into ``dek.new`` (a new one on every fresh start:
   nothing is sealed with it until the marker naming its check token is committed);
3. the marker is committed, then the batches run;
4. encrypt: ``dek.new`` is renamed to ``dek``; the commit that stores the new check token
   (``meta.enc``) also deletes the marker. decrypt: that commit clears ``meta.enc``, then
   the old data key is shredded;
5. the sentinel is removed.

Index entries (their keys are field values in plain text) are dropped by `encrypt`'s
last commit, before the compaction; the agent rebuilds them at its next start when
storage.plaintext_indexes allows.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb
import orjson

from agent.crypto import ValueCipher
from agent.errors import (
    ConversionPending,
    EncryptionKeyError,
    StorageFormatError,
    StoreInUse,
    StoreUnusable,
)
from agent.keyring import DEK_FILE, KeyEncryptionKey, new_data_key, rewrap, shred, unwrap_file
from agent.service.lock import FileLock, acquire_service_lock
from agent.store import DB_NAMES, ENCRYPTED_DBS, ENV_DIRNAME, FORMAT_VERSION
from waystation.atrest import files, rewrite
from waystation.atrest.outcome import Outcome
from waystation.atrest.rawenv import RawEnv

NEW_DEK_FILE = DEK_FILE + ".new"
MARKER = b"atrest"
INDEX_REGISTRY = b"idx"  # agent.query.maintain.META_KEY
_NAMES = tuple(n for n in DB_NAMES if n in ENCRYPTED_DBS)


def pending_error(env_dir: Path, op: str) -> ConversionPending:
    return ConversionPending(
        f"the local store at {env_dir} is half-way through `waystation agent {op}` (it was "
        f"interrupted, or runs now): run `waystation agent {op}` again to finish it; no "
        "data is lost, every value is readable by the conversion")


# ----------------------------------------------------------------------- the raw store


class _Raw(RawEnv):
    """The agent's environment opened for a conversion; meta values are orjson."""

    def __init__(self, env_dir: Path, max_map_size_mb: int) -> None:
        super().__init__(env_dir, DB_NAMES, meta_db="meta", marker_key=MARKER,
                         max_map_size=max_map_size_mb << 20, fail=StoreUnusable,
                         what="local store")

    def meta(self, name: str) -> Any:
        raw = self.meta_raw(name.encode())
        return None if raw is None else orjson.loads(raw)


@contextlib.contextmanager
def _exclusive(data_dir: Path, max_map_size_mb: int) -> Iterator[_Raw]:
    lock: FileLock = acquire_service_lock(data_dir)
    try:
        raw = _Raw(data_dir / ENV_DIRNAME, max_map_size_mb)
        try:
            others = raw.others()
            if others:
                raise StoreInUse(
                    f"the local store at {raw.env_dir} is open in other processes (PIDs "
                    f"{', '.join(map(str, others))}): stop the apps and commands using it, "
                    "then run this again")
            fmt = raw.meta("format")
            if not isinstance(fmt, int) or not 1 <= fmt <= FORMAT_VERSION:
                raise StorageFormatError(
                    f"the local store at {raw.env_dir} has on-disk format {fmt}; this agent "
                    f"converts formats up to {FORMAT_VERSION}: run the agent version that "
                    "wrote it")
            yield raw
        finally:
            raw.close()
    finally:
        lock.release()


def _state(raw: _Raw) -> str:
    if raw.meta("enc") is None:
        return "plain"
    return "envelope" if (raw.env_dir / DEK_FILE).exists() else "legacy"


def _old_cipher(raw: _Raw, state: str, kek: KeyEncryptionKey) -> ValueCipher | None:
    """The cipher the store's values are sealed with now, checked against the store."""
    if state == "plain":
        return None
    if state == "legacy":
        cipher = kek.legacy_cipher()
    else:
        path = raw.env_dir / DEK_FILE
        cipher = ValueCipher(unwrap_file(path, kek), f"{kek.source} (data key {path})")
    if not cipher.verify(_token(raw.meta("enc"))):
        raise EncryptionKeyError(
            f"the encryption key from {kek.source} is not the key the local store at "
            f"{raw.env_dir} was encrypted with")
    return cipher


def _token(value: Any) -> bytes:
    """A stored check token (hex); b"" (which verifies nothing) when it is damaged."""
    try:
        return bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        return b""


def _finish(raw: _Raw, enc: str | None) -> None:
    def run(txn: lmdb.Transaction[bytes]) -> None:
        txn.put(b"enc", orjson.dumps(enc), db=raw.dbs["meta"])
        txn.delete(MARKER, db=raw.dbs["meta"])
        if enc is not None:
            # Index keys hold field values in plain text: dropped with their registry
            # here, so that the compaction leaves none behind; the agent rebuilds them at
            # its next start if storage.plaintext_indexes allows (agent.query.maintain).
            txn.drop(raw.dbs["index"], delete=False)
            txn.delete(INDEX_REGISTRY, db=raw.dbs["meta"])
    rewrite.write(raw.target, run)


# ------------------------------------------------------------------------ commands


def encrypt(data_dir: Path, kek: KeyEncryptionKey, *, max_map_size_mb: int = 4096,
            batch: int = 1000) -> Outcome:
    """Encrypt the store at `data_dir` with a new data key wrapped by `kek` (a plain or a
    legacy store), or finish an interrupted `encrypt`."""
    with _exclusive(Path(data_dir), max_map_size_mb) as raw:
        env_dir = raw.env_dir
        marker = rewrite.read_marker(raw.target)
        if marker is not None and marker.get("to") != "envelope":
            raise pending_error(env_dir, "decrypt")
        resumed = marker is not None or files.pending(env_dir) is not None
        if marker is None:
            before = _state(raw)
            old = _old_cipher(raw, before, kek)
            if before == "envelope":
                if files.pending(env_dir) is not None:
                    raw.compact()  # an encrypt that stopped after its last commit
                    files.clear_pending(env_dir)
                return Outcome("encrypt", str(env_dir), before, before, False, resumed, 0,
                               str(env_dir / DEK_FILE), "the local store is encrypted already "
                               "(envelope encryption); nothing to do")
            files.mark_pending(env_dir, "encrypt")
            new = ValueCipher(new_data_key(env_dir / NEW_DEK_FILE, kek))
            rewrite.kill_point("dek")
            rewrite.start(raw.target, {"from": before, "to": "envelope",
                                       "check": new.check_token().hex()})
            rewrite.kill_point("marker")
        else:
            before = str(marker["from"])
            old = _old_cipher(raw, before, kek)
            new = _resume_new_key(env_dir, kek, str(marker["check"]))
        count = rewrite.convert(raw.target, _NAMES, old, new, batch=batch)
        if (env_dir / NEW_DEK_FILE).exists():
            os.replace(env_dir / NEW_DEK_FILE, env_dir / DEK_FILE)
            files.fsync_dir(env_dir)
        rewrite.kill_point("renamed")
        current = rewrite.read_marker(raw.target)
        _finish(raw, None if current is None else str(current["check"]))
        rewrite.kill_point("finished")
        raw.compact()
        rewrite.kill_point("compacted")
        files.clear_pending(env_dir)
    return Outcome("encrypt", str(env_dir), before, "envelope", True, resumed, count,
                   str(env_dir / DEK_FILE),
                   f"the local store is encrypted ({count} values rewritten"
                   f"{', resumed' if resumed else ''}); keep "
                   + ("the key you gave on standard input (storage.encryption_key_file, or "
                      "the systemd credential, must name a file holding it)" if kek.streamed
                      else f"the key file {kek.source}")
                   + ": without it the store cannot be read")


def _resume_new_key(env_dir: Path, kek: KeyEncryptionKey, check: str) -> ValueCipher:
    path = env_dir / NEW_DEK_FILE
    if not path.exists():
        path = env_dir / DEK_FILE  # renamed just before the crash
    cipher = ValueCipher(unwrap_file(path, kek), f"{kek.source} (data key {path})")
    if not cipher.verify(_token(check)):
        raise EncryptionKeyError(
            f"the data key {path} is not the one the interrupted `waystation agent encrypt` "
            "started with (was it replaced?): restore it, or restore the store from a backup")
    return cipher


def decrypt(data_dir: Path, kek: KeyEncryptionKey, *, max_map_size_mb: int = 4096,
            batch: int = 1000) -> Outcome:
    """Store every value in plain text again and shred the data key (or finish an
    interrupted `decrypt`)."""
    with _exclusive(Path(data_dir), max_map_size_mb) as raw:
        env_dir = raw.env_dir
        marker = rewrite.read_marker(raw.target)
        if marker is not None and marker.get("to") != "plain":
            raise pending_error(env_dir, "encrypt")
        resumed = marker is not None or files.pending(env_dir) is not None
        if marker is None:
            before = _state(raw)
            if before == "plain":
                shred(env_dir)  # a decrypt that stopped after its last commit
                files.clear_pending(env_dir)
                return Outcome("decrypt", str(env_dir), before, before, False, resumed, 0,
                               None, "the local store is not encrypted; nothing to do")
            old = _old_cipher(raw, before, kek)
            files.mark_pending(env_dir, "decrypt")
            rewrite.start(raw.target, {"from": before, "to": "plain", "check": None})
            rewrite.kill_point("marker")
        else:
            before = str(marker["from"])
            old = _old_cipher(raw, before, kek)
        count = rewrite.convert(raw.target, _NAMES, old, None, batch=batch)
        _finish(raw, None)
        rewrite.kill_point("finished")
        shred(env_dir)
        files.clear_pending(env_dir)
    return Outcome("decrypt", str(env_dir), before, "plain", True, resumed, count, None,
                   f"the local store is no longer encrypted ({count} values rewritten); "
                   "remove storage.encryption_key_file from the agent's config before "
                   "starting it")


def rekey(data_dir: Path, old: KeyEncryptionKey, new: KeyEncryptionKey, *,
          max_map_size_mb: int = 4096) -> Outcome:
    """Wrap the store's data key with `new` (the store itself is not rewritten)."""
    with _exclusive(Path(data_dir), max_map_size_mb) as raw:
        env_dir = raw.env_dir
        if rewrite.read_marker(raw.target) is not None or files.pending(env_dir):
            raise pending_error(env_dir, files.pending(env_dir) or "encrypt")
        state = _state(raw)
        if state == "plain":
            raise EncryptionKeyError(
                f"the local store at {env_dir} is not encrypted: there is no data key to "
                "re-wrap (turn encryption on with `waystation agent encrypt`)")
        if state == "legacy":
            raise EncryptionKeyError(
                f"the local store at {env_dir} was encrypted before envelope encryption "
                "(its values are sealed with the key file itself): run `waystation agent "
                "encrypt` first, which moves it to a data key, then rekey")
        _old_cipher(raw, state, old)  # the right key, and the data key matches the store
        rewrap(env_dir, old, new)
        rewrite.kill_point("rekeyed")
    return Outcome("rekey", str(env_dir), state, state, True, False, 0,
                   str(env_dir / DEK_FILE),
                   f"the data key is now wrapped with {new.named('new')}: point "
                   "storage.encryption_key_file (or the systemd credential) at "
                   f"{'a file holding it' if new.streamed else 'it'} before the agent "
                   f"starts again; {old.named('old')} no longer opens this store")


__all__ = ["MARKER", "NEW_DEK_FILE", "Outcome", "decrypt", "encrypt", "pending_error", "rekey"]
