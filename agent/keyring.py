"""The store's data key, wrapped by the operator's key (envelope encryption at rest).

    storage.encryption_key_file ──HKDF──► key-encryption key (KEK)
                                             │ wraps (AES-256-GCM)
    <data_dir>/agent.lmdb/dek  ◄─────────────┘  a random 32-byte data key (DEK)
                                             │ seals every stored value (agent.crypto)
    <data_dir>/agent.lmdb/data.mdb ◄─────────┘

The DEK lives in its own small file, outside LMDB, so that destroying it is one
overwrite-and-unlink (crypto-shredding: `shred`, used by a remote wipe) and changing the
operator's key re-wraps 48 bytes instead of re-encrypting the store. LMDB never holds the
DEK: its copy-on-write pages could keep an old copy on disk.

Stores encrypted before envelope encryption existed have no `dek` file: their values are
sealed with the key file's own bytes (`legacy`), as before.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from agent.crypto import MIN_KEY_FILE_BYTES, ValueCipher
from agent.errors import EncryptionKeyError
from waystation.atrest import files
from waystation.atrest.files import write_atomic

DEK_FILE = "dek"
_MAGIC = b"WSDEK1"
_AAD = b"waystation data key v1"
_SALT = b"waystation-agent-kek-v1"


class KeyEncryptionKey:
    """The operator's key (storage.encryption_key_file), used only to wrap data keys."""

    __slots__ = ("_aead", "_material", "fingerprint", "source")

    def __init__(self, material: bytes, source: str = "<memory>") -> None:
        if len(material) < MIN_KEY_FILE_BYTES:
            raise EncryptionKeyError(
                f"the encryption key {source} holds {len(material)} bytes; it needs at "
                f"least {MIN_KEY_FILE_BYTES} (use 32 random bytes: head -c 32 /dev/urandom)")
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=_SALT,
                   info=b"wrap data keys").derive(material)
        self._aead = AESGCM(key)
        self._material = material
        self.fingerprint = ValueCipher(material).fingerprint
        self.source = source

    @property
    def streamed(self) -> bool:
        """Read from a pipe (`--key-file /dev/stdin < KEYFILE`, as the operator guide
        does): its path names no key the operator can keep or point a config at."""
        return self.source in ("-", "/dev/stdin") or self.source.startswith(
            ("/dev/fd/", "/proc/self/fd/"))

    def named(self, role: str) -> str:
        """The key as a message names it: its file, or for a streamed one "the new key
        you gave on /dev/fd/3" (that path names nothing once the command has ended)."""
        return f"the {role} key you gave on {self.source}" if self.streamed else self.source

    @classmethod
    def from_file(cls, path: Path, what: str = "storage.encryption_key_file"
                  ) -> KeyEncryptionKey:
        try:
            material = path.read_bytes()
        except OSError as exc:
            raise EncryptionKeyError(
                f"cannot read the encryption key file {path} "
                f"({what}): {exc.strerror or exc}") from None
        return cls(material, str(path))

    def wrap(self, dek: bytes) -> bytes:
        nonce = os.urandom(12)
        return _MAGIC + nonce + self._aead.encrypt(nonce, dek, _AAD)

    def unwrap(self, blob: bytes, where: Path) -> bytes:
        if not blob.startswith(_MAGIC) or len(blob) < len(_MAGIC) + 12 + 16:
            raise EncryptionKeyError(f"{where} is not a Waystation data key file")
        body = blob[len(_MAGIC):]
        try:
            return self._aead.decrypt(body[:12], body[12:], _AAD)
        except (InvalidTag, ValueError):
            raise EncryptionKeyError(
                f"the encryption key from {self.source} is not the key the local store's "
                f"data key ({where}) was wrapped with") from None

    def legacy_cipher(self) -> ValueCipher:
        """The cipher of a store encrypted before envelope encryption: the key file's
        bytes are its data key."""
        return ValueCipher(self._material, self.source)


def data_cipher(env_dir: Path, kek: KeyEncryptionKey, *, new_store: bool) -> ValueCipher:
    """The cipher sealing the store's values: its unwrapped data key (created with a new
    store), or the legacy key-file cipher for a store from before envelope encryption."""
    path = env_dir / DEK_FILE
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        if not new_store:
            return kek.legacy_cipher()
        dek = os.urandom(32)
        files.write_atomic(path, kek.wrap(dek))
        return ValueCipher(dek, f"{kek.source} (data key {path})")
    except OSError as exc:
        raise EncryptionKeyError(f"cannot read the data key {path}: "
                                 f"{exc.strerror or exc}") from None
    return ValueCipher(kek.unwrap(blob, path), f"{kek.source} (data key {path})")


def unwrap_file(path: Path, kek: KeyEncryptionKey) -> bytes:
    """The data key wrapped in `path`; EncryptionKeyError naming the file when it is
    missing, unreadable, damaged or wrapped with another key."""
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise EncryptionKeyError(f"the data key file {path} is missing: the store's values "
                                 "cannot be decrypted without it (restore it from the "
                                 "backup taken with the store)") from None
    except OSError as exc:
        raise EncryptionKeyError(f"cannot read the data key {path}: "
                                 f"{exc.strerror or exc}") from None
    dek = kek.unwrap(blob, path)
    if len(dek) != 32:
        raise EncryptionKeyError(f"{path} does not hold a 32-byte data key (damaged?)")
    return dek


def new_data_key(path: Path, kek: KeyEncryptionKey) -> bytes:
    """A new random data key, wrapped with `kek` into `path` (crash-safe); returns it."""
    dek = os.urandom(32)
    files.write_atomic(path, kek.wrap(dek))
    return dek


def rewrap(env_dir: Path, old: KeyEncryptionKey, new: KeyEncryptionKey,
           name: str = DEK_FILE) -> str:
    """Wrap the store's data key with `new` instead of `old`: 48 bytes rewritten, the
    store untouched (O(1)). Crash-safe: the new wrap goes to a temp file, is fsynced,
    read back and checked, then renamed over the old one, so the file holds the old or
    the new wrap, never neither. Returns the data key's fingerprint."""
    path = env_dir / name
    dek = unwrap_file(path, old)
    write_atomic(path, new.wrap(dek))
    if unwrap_file(path, new) != dek:  # pragma: no cover - a broken disk
        raise EncryptionKeyError(f"{path} did not read back as written: check the disk")
    return ValueCipher(dek).fingerprint


def shred(env_dir: Path) -> bool:
    """Destroy the store's data key (overwrite, flush, unlink); True if there was one.

    Without it the sealed values in data.mdb — and in any copy of it, or in disk blocks
    it leaves behind — cannot be decrypted, even with the operator's key.
    """
    path = env_dir / DEK_FILE
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    with open(path, "r+b", buffering=0) as fh:
        fh.write(os.urandom(max(size, 64)))
        os.fsync(fh.fileno())
    path.unlink()
    files.fsync_dir(env_dir)
    return True


def replace_key_file(path: Path) -> bool:
    """Destroy a legacy store's key file (its bytes are that store's data key) by
    overwriting it in place with a new random key, which then wraps the data key of the
    store created after the wipe. False when it cannot be written (a read-only systemd
    credential, say)."""
    try:
        with open(path, "r+b", buffering=0) as fh:
            size = os.fstat(fh.fileno()).st_size
            fh.write(os.urandom(max(size, 32)))
            os.fsync(fh.fileno())
    except OSError:
        return False
    return True


__all__ = ["DEK_FILE", "KeyEncryptionKey", "data_cipher", "new_data_key", "replace_key_file",
           "rewrap", "shred", "unwrap_file"]
