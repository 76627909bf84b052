"""The agent store's on-disk format: the version this agent writes, the migrations from
older formats, and the check run when a store is opened (format version and encryption
key against what the store records in meta).

No I/O of its own, only reads and writes of meta through a `Tx`: `agent.store` runs
`check_format` inside the transaction that opens the store, so a migration is all or
nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from agent.crypto import ValueCipher
from agent.errors import EncryptionKeyError, StorageFormatError
from agent.store_tx import Tx

FORMAT_VERSION = 2
"""On-disk format this agent writes. 1: the first release. 2: a store incarnation in
meta (``inc``) and per outbox entry (``i``). Older formats are migrated in place, in the
opening transaction (`_MIGRATIONS`); a newer format is refused (downgrade)."""


def _migrate_1_to_2(tx: Tx) -> None:
    """Format 2 adds incarnations. Nothing stored is rewritten: outbox entries without
    an incarnation are the legacy one's, and the agent gives the store its first
    incarnation when it claims it (`agent.core.Core.claim_identity`)."""


_MIGRATIONS: dict[int, Callable[[Tx], None]] = {1: _migrate_1_to_2}
"""Format n -> n + 1, run inside the transaction that opens the store (all or nothing)."""


def check_format(tx: Tx, path: Path, cipher: ValueCipher | None) -> None:
    """Stamp a new store with the format and encryption token, or check an existing one:
    migrate an older format, refuse a newer one, and refuse a key (or its absence) that
    does not match the one the store was created with."""
    version = tx.meta("format")
    if version is None:
        tx.set_meta("format", FORMAT_VERSION)
        tx.set_meta("enc", None if cipher is None else cipher.check_token().hex())
        return
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise StorageFormatError(
            f"the local store at {path} has on-disk format {version}, but this agent "
            f"reads formats up to {FORMAT_VERSION}: run the agent version that wrote it "
            "(or a newer one); never move the data_dir aside while it holds unsynced "
            "writes")
    while version < FORMAT_VERSION:
        _MIGRATIONS[version](tx)
        version += 1
        tx.set_meta("format", version)
    token = tx.meta("enc")
    if token is not None and cipher is None:
        raise EncryptionKeyError(
            f"the local store at {path} is encrypted: set "
            "storage.encryption_key_file to the key file it was created with")
    if token is None and cipher is not None:
        raise EncryptionKeyError(
            f"the local store at {path} was created without encryption: remove "
            "storage.encryption_key_file, or start an encrypted store in a new data_dir")
    if token is not None and cipher is not None and not cipher.verify(bytes.fromhex(token)):
        raise EncryptionKeyError(
            f"the encryption key from {cipher.source} is not the key the local "
            f"store at {path} was encrypted with")


__all__ = ["FORMAT_VERSION", "check_format"]
