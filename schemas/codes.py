"""The rejection codes of PROTOCOL.md §8.

    The rejection codes of §8 are the constants `MALFORMED` ... `SERVER_ERROR`;
`ALL_CODES`, `PERMANENT_CODES` and `TRANSIENT_CODES` group them, and
`is_permanent(code)` tells how a device must treat a code (unknown codes are
permanent, as §8 says for a rejection whose `perm` is true).
"""

from __future__ import annotations

from typing import Final

MALFORMED: Final = "malformed"
TOO_LARGE: Final = "too_large"
UNSUPPORTED_VERSION: Final = "unsupported_version"
UNKNOWN_TYPE: Final = "unknown_type"
INVALID: Final = "invalid"
WRONG_DEVICE: Final = "wrong_device"
UNKNOWN_DEVICE: Final = "unknown_device"
ID_REUSED: Final = "id_reused"
DEVICE_DISABLED: Final = "device_disabled"
SCOPE_DENIED: Final = "scope_denied"
UNKNOWN_COLLECTION: Final = "unknown_collection"
UNKNOWN_FIELD: Final = "unknown_field"
TYPE_MISMATCH: Final = "type_mismatch"
WRONG_STRATEGY: Final = "wrong_strategy"
SCOPE_MISMATCH: Final = "scope_mismatch"
CLOCK_SKEW: Final = "clock_skew"
RULE_REJECTED: Final = "rule_rejected"
RECORD_TOO_LARGE: Final = "record_too_large"
SCHEMA_VERSION: Final = "schema_version"
SERVER_ERROR: Final = "server_error"
TXN_ABORTED: Final = "txn_aborted"
DICTIONARY_UNKNOWN: Final = "dictionary_unknown"
"""A `zd3` stream made with references the server does not hold (§3): send again with
`zd2`. Only a device that agreed to `zd3` is told this."""

TRANSIENT_CODES: Final[frozenset[str]] = frozenset(
    {SCHEMA_VERSION, SERVER_ERROR, DEVICE_DISABLED, DICTIONARY_UNKNOWN})
PERMANENT_CODES: Final[frozenset[str]] = frozenset(
    {
        MALFORMED,
        TOO_LARGE,
        UNSUPPORTED_VERSION,
        UNKNOWN_TYPE,
        INVALID,
        WRONG_DEVICE,
        UNKNOWN_DEVICE,
        ID_REUSED,
        SCOPE_DENIED,
        UNKNOWN_COLLECTION,
        UNKNOWN_FIELD,
        TYPE_MISMATCH,
        WRONG_STRATEGY,
        SCOPE_MISMATCH,
        CLOCK_SKEW,
        RULE_REJECTED,
        RECORD_TOO_LARGE,
        TXN_ABORTED,
    }
)
ALL_CODES: Final[frozenset[str]] = PERMANENT_CODES | TRANSIENT_CODES


def is_permanent(code: str) -> bool:
    """True unless `code` is one of the transient codes (§8: retry later)."""
    return code not in TRANSIENT_CODES


__all__ = [
    "ALL_CODES",
    "CLOCK_SKEW",
    "DEVICE_DISABLED",
    "DICTIONARY_UNKNOWN",
    "ID_REUSED",
    "INVALID",
    "MALFORMED",
    "PERMANENT_CODES",
    "RECORD_TOO_LARGE",
    "RULE_REJECTED",
    "SCHEMA_VERSION",
    "SCOPE_DENIED",
    "SCOPE_MISMATCH",
    "SERVER_ERROR",
    "TOO_LARGE",
    "TRANSIENT_CODES",
    "TXN_ABORTED",
    "TYPE_MISMATCH",
    "UNKNOWN_COLLECTION",
    "UNKNOWN_DEVICE",
    "UNKNOWN_FIELD",
    "UNKNOWN_TYPE",
    "UNSUPPORTED_VERSION",
    "WRONG_DEVICE",
    "WRONG_STRATEGY",
    "is_permanent",
]
