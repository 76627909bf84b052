"""Errors of the server side (merge consumer, its store and the operator CLI).

    WaystationError
    └── ServerError                 anything the server raises on purpose
        ├── StoreError              the store cannot be opened, read or written
        │   ├── StoreKeyError       missing, unreadable or wrong store encryption key
        │   └── ServerIdTaken       `server run` while a process here runs that server id
        ├── BadStoredRecord         a stored record this version cannot decode
        │   ├── StoreFormatError    the on-disk format is not the one this version reads
        │   └── StoreFullError      the store reached its configured maximum size
        ├── UnknownDevice           no such device in the registry (CLI)
        ├── DeviceExists            a device with that id is already registered (CLI)
        ├── ConflictNotFound        no conflict with that id (CLI)
        ├── ConflictClosed          the conflict was already resolved (CLI)
        ├── InvalidArgument         an operator argument is wrong (CLI)
        ├── LetterNotRetryable      a dead letter holds nothing to run again (CLI)
        ├── ServerRunning           refused while that merge server runs (CLI)
        └── NotFound                what the operator named does not exist
            ├── UnknownCollection   no such collection in the schema or the store
            ├── RecordNotFound      no record with that key
            └── DeadLetterNotFound  no dead letter with that id

Every message is one sentence an operator can act on; the CLI prints it on one line and
exits non-zero.
"""

from __future__ import annotations

from waystation.errors import WaystationError


class ServerError(WaystationError):
    """Base class of the server's deliberate errors."""


class StoreError(ServerError):
    """The server's store failed; the message names the store and what to check."""

    exit_code = 3


class StoreKeyError(StoreError):
    """The store's encryption key (store.encryption_key_file) is missing, unreadable or
    not the one the store was encrypted with; a configuration error (exit code 2)."""

    exit_code = 2


class ServerIdTaken(StoreError):
    """`server run` refused: another process on this host runs as the same merge server
    (same server_id, same store). Exit code 3, as an agent started twice on one store."""


class StoreFormatError(StoreError):
    """The store on disk was written by an incompatible version of Waystation."""


class StoreFullError(StoreError):
    """The store reached `store.max_map_size_mb`; raise it or free disk space."""


class BadStoredRecord(ServerError):
    """A record in the store is not in the format this version reads (written by
    another version of Waystation)."""


class UnknownDevice(ServerError):
    """The named device is not registered."""


class DeviceExists(ServerError):
    """A device with this id is already registered."""


class ConflictNotFound(ServerError):
    """No conflict-log entry has this id."""


class ConflictClosed(ServerError):
    """The conflict was already resolved."""


class InvalidArgument(ServerError):
    """An operator-supplied argument is invalid."""

    exit_code = 2


class NotFound(ServerError):
    """What the operator named (collection, record, dead letter) does not exist (exit
    code 1, "the operation failed", as every refused operation)."""


class UnknownCollection(NotFound):
    """The collection is neither in the server's schema nor in its store."""


class RecordNotFound(NotFound):
    """No record with that collection and key is in the store."""


class DeadLetterNotFound(NotFound):
    """No dead letter with that id is kept (never was, or discarded, retried, or
    dropped by the bounds)."""


class LetterNotRetryable(ServerError):
    """The dead letter holds nothing the server can run again (a status message, a
    payload cut at 64 KiB, a hello or catch-up request the device repeats itself)."""


class ServerRunning(ServerError):
    """Refused while the named merge server runs (`server forget`): the operation
    failed (exit 1), the command line was right."""


__all__ = [
    "BadStoredRecord",
    "ConflictClosed",
    "ConflictNotFound",
    "DeadLetterNotFound",
    "DeviceExists",
    "InvalidArgument",
    "LetterNotRetryable",
    "NotFound",
    "RecordNotFound",
    "ServerError",
    "ServerIdTaken",
    "ServerRunning",
    "StoreError",
    "StoreFormatError",
    "StoreFullError",
    "StoreKeyError",
    "UnknownCollection",
    "UnknownDevice",
]
