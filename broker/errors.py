"""Errors of the server side (merge consumer, its store and the operator CLI).

    WaystationError
    └── ServerError                 anything the server raises on purpose
        ├── StoreError              the store cannot be opened, read or written
        │   ├── StoreFormatError    the on-disk format is not the one this version reads
        │   └── StoreFullError      the store reached its configured maximum size
        ├── UnknownDevice           no such device in the registry (CLI)
        ├── DeviceExists            a device with that id is already registered (CLI)
        ├── ConflictNotFound        no conflict with that id (CLI)
        ├── ConflictClosed          the conflict was already resolved (CLI)
        └── InvalidArgument         an operator argument is wrong (CLI)

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


class StoreFormatError(StoreError):
    """The store on disk was written by an incompatible version of Waystation."""


class StoreFullError(StoreError):
    """The store reached `store.max_map_size_mb`; raise it or free disk space."""


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


__all__ = [
    "ConflictClosed",
    "ConflictNotFound",
    "DeviceExists",
    "InvalidArgument",
    "ServerError",
    "StoreError",
    "StoreFormatError",
    "StoreFullError",
    "UnknownDevice",
]
