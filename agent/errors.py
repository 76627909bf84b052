"""Errors of the device agent.

    WaystationError
    └── AgentError                  anything the agent raises on purpose
        ├── StorageError            the local store failed (LMDB error, corrupt file, ...)
        │   ├── StoreGone           the store was wiped (remote wipe): reopen it
        │   ├── StorageFullError    the disk or the configured map-size limit is full
        │   ├── QuotaReached        the device's disk quota (storage.quota_bytes) is used
        │   ├── StoreDamaged        the store's file is damaged (truncated, overwritten,
        │   │                       not a file): move it aside, start fresh
        │   ├── StorageFormatError  the store was written in another on-disk format
        │   ├── EncryptionKeyError  missing, unreadable or wrong encryption key
        │   ├── ConversionPending   `agent encrypt` / `decrypt` is under way or was cut short
        │   ├── StoreInUse          another process has the store open (for a conversion)
        │   └── StoreUnusable       a conversion cannot use the store (missing, other owner)
        ├── AgentNotInitialised     no local store yet at the configured data_dir
        ├── DeviceMismatch          the data_dir belongs to another device id
        ├── BadRequest              a request names an unknown collection, a bad key, ...
        │   └── WriteRefused        a local write is invalid (schema, type, scope); `code`
        └── NotFound                a record / dead letter asked for does not exist

Every message is one sentence an operator or app developer can act on; the CLI prints it
as one line. Errors of the wrapped library (lmdb, cryptography) are converted in
`agent.store` and `agent.crypto`, never leak out raw.
"""

from __future__ import annotations

from waystation.errors import WaystationError


class AgentError(WaystationError):
    """Base of every error the device agent raises deliberately."""


class StorageError(AgentError):
    """The local LMDB store failed; the message says which file and why."""


class StoreNeedsWrite(StorageError):
    """Opened only to read, the store turned out to need a write first: a database this
    agent version adds, or an older on-disk format to migrate (a store written by the
    previous release, before its daemon ran). The caller opens it normally instead."""


class StoreGone(StorageError):
    """This open store was wiped by the operator (a remote wipe) and replaced by an
    empty one: nothing can be written to it; open the agent again."""


class StorageFullError(StorageError):
    """No room left: the disk is full or the store reached storage.max_map_size_mb.

    Raised before anything of the refused write is stored; everything stored earlier is
    intact (LMDB commits are all-or-nothing).
    """

    def __init__(self, path: str, *, map_limit_mb: int | None = None) -> None:
        if map_limit_mb is None:
            message = (f"the disk holding {path} is full: free space; "
                       "nothing already stored was lost")
        else:
            message = (f"the local store at {path} reached its size limit "
                       f"(storage.max_map_size_mb = {map_limit_mb}): raise the limit or "
                       "free space; nothing already stored was lost")
        super().__init__(message)
        self.path = path
        self.map_limit_mb = map_limit_mb


class QuotaReached(StorageError):
    """A local write was refused: the store holds storage.quota_bytes or more. Syncing
    goes on (the outbox drains, acks free room) and retention evicts what the schema
    lets it; nothing stored was lost."""

    def __init__(self, used: int, quota: int) -> None:
        super().__init__(
            f"the device's disk quota is reached ({used} of storage.quota_bytes = {quota} "
            "bytes in use): nothing was written; wait for the outbox to drain and retention "
            "to evict synced records, declare retention for more collections, or raise "
            "storage.quota_bytes")
        self.used = used
        self.quota = quota


class StoreDamaged(StorageError):
    """The store's file is damaged (an SD card's bad block, a power loss the filesystem
    did not survive): truncated, overwritten, not a file, unreadable. Restarting cannot
    repair it, so the agent refuses it with one message naming the file and what to do
    (deploy/README.md, "A damaged device store"); it never rewrites the file."""

    exit_code = 6  # waystation.cli.exitcodes.EXIT_DAMAGED; RestartPreventExitStatus

    def __init__(self, path: str, detail: str, action: str | None = None) -> None:
        action = action or (
            "stop the agent, move its directory aside (never delete it: the pending changes "
            "still readable in it can be saved) and start the agent again on a fresh store; "
            "see \"A damaged device store\" in deploy/README.md")
        super().__init__(f"store damaged: the local store file {path} {detail}: {action}")
        self.path = path
        self.detail = detail


class StorageFormatError(StorageError):
    """The store's on-disk format version is not the one this agent reads."""

    exit_code = 2


class EncryptionKeyError(StorageError):
    """The encryption key is missing, unreadable, or not the one the data was written with."""

    exit_code = 2


class ConversionPending(StorageError):
    """The store's encryption is being changed, or a change was interrupted: the same
    command finishes it (`agent.atrest`)."""

    exit_code = 3


class StoreInUse(StorageError):
    """Another process has the store open, and the operation needs it alone."""

    exit_code = 3


class StoreUnusable(StorageError):
    """An operation that needs the store alone cannot use it: missing, unreadable, or
    owned by another user than the one running the command."""

    exit_code = 3


class AgentNotInitialised(AgentError):
    """Nothing has been stored on this device yet (no store at data_dir)."""


class DeviceMismatch(AgentError):
    """The store at data_dir was created for a different device id."""

    exit_code = 2


class BadRequest(AgentError):
    """A request is invalid (unknown collection, malformed key, ...); `code` names why
    with a rejection code of PROTOCOL.md §8."""

    exit_code = 2

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class WriteRefused(BadRequest):
    """A local write was refused before anything was stored.

    `code` is the rejection code the server would have answered (PROTOCOL.md §8):
    unknown_collection, unknown_field, type_mismatch, wrong_strategy, scope_denied,
    scope_mismatch, invalid, record_too_large.
    """


class NotFound(AgentError):
    """A record or dead letter that was asked for does not exist on this device."""


__all__ = [
    "AgentError",
    "AgentNotInitialised",
    "BadRequest",
    "ConversionPending",
    "DeviceMismatch",
    "EncryptionKeyError",
    "NotFound",
    "QuotaReached",
    "StorageError",
    "StorageFormatError",
    "StorageFullError",
    "StoreDamaged",
    "StoreGone",
    "StoreInUse",
    "StoreUnusable",
    "WriteRefused",
]
