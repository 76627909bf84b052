"""Errors of the `schemas` package.

    WaystationError
    ├── ProtocolError           bytes that are not a valid wire message; carries `code`
    └── CollectionSchemaError   an operator's collection schema file is wrong
        └── SchemaEvolutionError   a new version cannot follow the previous one as declared
"""

from __future__ import annotations

from waystation.errors import WaystationError


class ProtocolError(WaystationError):
    """A payload is not a valid message. `code` is a rejection code (PROTOCOL.md §8)."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


class CollectionSchemaError(WaystationError):
    """A collection schema file is invalid; the message names file, collection and field."""

    exit_code = 2


class SchemaEvolutionError(CollectionSchemaError):
    """A schema version cannot follow the previous one: a breaking change without a
    declared migration, or a migration that does not fit; the message says what to add."""


class MigrationError(WaystationError):
    """A value cannot be carried across a declared migration (e.g. "abc" -> int)."""
