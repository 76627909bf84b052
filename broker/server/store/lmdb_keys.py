"""The keys of the LMDB server store's encryption at rest (envelope encryption, as on
the devices: `agent.keyring`).

    store.encryption_key_file ──► key-encryption key (KEK)
                                     │ wraps
    {data_dir}/store/dek  ◄──────────┘  a random 32-byte data key
                                     │ seals the values of `lmdb_sealed.SEALED`
    {data_dir}/store/data.mdb ◄──────┘

The check token of the data key is kept in the store's meta table (``enc``), so a wrong
key is recognised when the store opens, not when a record fails to decrypt. Errors of
the shared key code are turned into `StoreKeyError` here, the one boundary.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path

from agent.crypto import ValueCipher
from agent.errors import EncryptionKeyError
from agent.keyring import DEK_FILE, KeyEncryptionKey, new_data_key, rewrap, unwrap_file
from broker.errors import StoreKeyError
from waystation.config import ServerConfig, expand_path

NEW_DEK_FILE = DEK_FILE + ".new"


@contextlib.contextmanager
def key_errors() -> Iterator[None]:
    """Turn the key code's EncryptionKeyError into the server's StoreKeyError."""
    try:
        yield
    except EncryptionKeyError as exc:
        raise StoreKeyError(str(exc).replace("storage.encryption_key_file",
                                             "store.encryption_key_file")) from None


def load_kek(path: Path, what: str = "store.encryption_key_file") -> KeyEncryptionKey:
    with key_errors():
        return KeyEncryptionKey.from_file(path, what)


def configured_kek(config: ServerConfig, env: Mapping[str, str]) -> KeyEncryptionKey | None:
    """The key of store.encryption_key_file (expanded from `env`), or None."""
    path = config.store.encryption_key_file
    if path is None:
        return None
    return load_kek(expand_path(path, env, key="store.encryption_key_file"))


def data_key(store_dir: Path, kek: KeyEncryptionKey, name: str = DEK_FILE) -> ValueCipher:
    """The cipher of the data key wrapped in `store_dir/name`."""
    path = store_dir / name
    with key_errors():
        return ValueCipher(unwrap_file(path, kek), f"{kek.source} (data key {path})")


def create_data_key(store_dir: Path, kek: KeyEncryptionKey,
                    name: str = DEK_FILE) -> ValueCipher:
    path = store_dir / name
    return ValueCipher(new_data_key(path, kek), f"{kek.source} (data key {path})")


def rewrap_data_key(store_dir: Path, old: KeyEncryptionKey, new: KeyEncryptionKey) -> str:
    with key_errors():
        return rewrap(store_dir, old, new)


def check(cipher: ValueCipher, token: bytes | None, store_dir: Path) -> None:
    """StoreKeyError unless `token` (meta ``enc``) was sealed by `cipher`."""
    if token is None or not cipher.verify(bytes.fromhex(token.decode(errors="replace"))
                                          if _hex(token) else b""):
        raise StoreKeyError(f"the encryption key from {cipher.source} is not the key the "
                            f"server store at {store_dir} was encrypted with")


def _hex(token: bytes) -> bool:
    try:
        bytes.fromhex(token.decode())
    except (UnicodeDecodeError, ValueError):
        return False
    return True


__all__ = ["DEK_FILE", "NEW_DEK_FILE", "check", "configured_kek", "create_data_key",
           "data_key", "key_errors", "load_kek", "rewrap_data_key"]
