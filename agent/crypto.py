"""Encryption at rest of the agent's record values (AES-256-GCM).

The key file (storage.encryption_key_file) should hold at least 32 random bytes, e.g.
``head -c 32 /dev/urandom > key``; it may be given to the service as a systemd
credential. The AES key is derived from the file's bytes with HKDF-SHA256, so any
length of at least 16 bytes works (a passphrase is *not* stretched: use random bytes).

Each stored value is ``nonce (12 random bytes) || ciphertext || tag``, with the database
name and the LMDB key as associated data, so a value moved to another key or database
fails to decrypt. What is encrypted: the values of the view, base, stamps, outbox,
deadletters and conflicts databases (field values, stamps, changes). What stays in
plain text: LMDB keys (collection names and record keys, change numbers), checkpoints,
the local change feed (collection and key names only) and the agent's metadata (device
id, clock, counters).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from agent.errors import EncryptionKeyError

MIN_KEY_FILE_BYTES = 16
_SALT = b"waystation-agent-store-v1"
_INFO = b"lmdb value encryption"
_CHECK_PLAINTEXT = b"waystation encryption check v1"
ALGORITHM = "AES-256-GCM/HKDF-SHA256"


class ValueCipher:
    """Seals and opens stored values with one key."""

    __slots__ = ("_aead", "fingerprint", "source")

    def __init__(self, key_material: bytes, source: str = "<memory>") -> None:
        if len(key_material) < MIN_KEY_FILE_BYTES:
            raise EncryptionKeyError(
                f"the encryption key {source} holds {len(key_material)} bytes; it needs at "
                f"least {MIN_KEY_FILE_BYTES} (use 32 random bytes: head -c 32 /dev/urandom)")
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=_SALT,
                   info=_INFO).derive(key_material)
        self._aead = AESGCM(key)
        self.fingerprint = hashlib.sha256(b"fp" + key).hexdigest()[:16]
        self.source = source

    @classmethod
    def from_file(cls, path: Path) -> ValueCipher:
        try:
            material = path.read_bytes()
        except OSError as exc:
            raise EncryptionKeyError(
                f"cannot read the encryption key file {path} "
                f"(storage.encryption_key_file): {exc.strerror or exc}") from None
        return cls(material, str(path))

    def seal(self, aad: bytes, plaintext: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, plaintext, aad)

    def open(self, aad: bytes, sealed: bytes) -> bytes:
        """Decrypt; EncryptionKeyError when the key is wrong or the value was altered."""
        try:
            return self._aead.decrypt(sealed[:12], sealed[12:], aad)
        except (InvalidTag, ValueError):
            raise EncryptionKeyError(
                f"a stored value does not decrypt with the key from {self.source}: the key "
                "is not the one this store was written with, or the file was altered"
            ) from None

    def check_token(self) -> bytes:
        """A sealed known text, kept in the store to recognise the right key on open."""
        return self.seal(b"meta\0check", _CHECK_PLAINTEXT)

    def verify(self, token: bytes) -> bool:
        try:
            return self._aead.decrypt(token[:12], token[12:], b"meta\0check") == _CHECK_PLAINTEXT
        except (InvalidTag, ValueError):
            return False


__all__ = ["ALGORITHM", "MIN_KEY_FILE_BYTES", "ValueCipher"]
