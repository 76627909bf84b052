"""The single entry point between wire bytes and typed messages (PROTOCOL.md §3, §8).

Decoding
    ``decode(payload, *, allowed=None, max_payload=..., max_decompressed=...) -> Message``
    turns any input into a typed message of `schemas.wire` or raises `ProtocolError`
    whose `code` is a rejection code of §8 and whose `reason` is a short (< 300
    characters) human-readable sentence that never echoes a large part of the input.
    It raises nothing else, whatever it is given. Checks run in this order:

    1. the payload is bytes-like (bytes, bytearray, memoryview or any buffer;
       anything else is `malformed`) and at most `max_payload` bytes (`too_large`);
    2. a payload whose first byte is 0x78 is a zlib stream: it is inflated with a
       bounded output buffer, so a zip bomb never allocates more than
       `max_decompressed` bytes (`too_large` beyond that, `malformed` if the stream
       is broken, truncated or followed by trailing bytes, or asks for a preset
       dictionary this process does not know: `schemas.zdict.DICTIONARY` (zd1) or
       the dictionary of a schema version it has parsed, `schemas.zdict_schema` (zd2));
    3. the JSON text is parsed with orjson; it must be a JSON object (`malformed`
       otherwise: invalid UTF-8, lone surrogates, NaN / Infinity, trailing data, ...);
       duplicate member names are accepted, the last one wins;
    4. `v` must be the integer 1 (`unsupported_version`; `true`, `1.0` and `"1"` are
       not 1); a missing `v` is `invalid`;
    5. `type` must be a string naming a message in `allowed` (default: every message
       type, `schemas.wire.ALL_TYPES`), else `unknown_type`; a missing `type` is
       `invalid`;
    6. a `changes` batch with more than 1,000 changes is `too_large`;
    7. every JSON number in the message (unknown members included) that is an integer
       must satisfy |x| < 2^53, and the message may nest at most `MAX_MESSAGE_DEPTH`
       levels (the deepest legitimate message plus a 32-level value), else `invalid`;
    8. the message's model validates it (`invalid`, the reason names the first
       offending member path, e.g. ``ch.3.n: Input should be greater than or equal
       to 1``). Values of fields are further limited to 32 levels by the models.

Lenient decoding of change batches
    A server must not let one bad change block the others of its batch (§10.1).
    ``decode_lenient(payload, *, allowed=None, ...) -> Message | LenientChanges``
    behaves like `decode` except for `changes` messages: these always come back as
    a `LenientChanges` holding the envelope (`dev`, `sv`), a `Changes` message with
    the valid changes (None when no change is valid) and one `BadChange` (index in
    `ch`, change number `n` when it is a valid number, else None, and the
    `ProtocolError`, code `invalid`) per invalid change, in batch order. Errors of
    the envelope (bytes, `v`, `type`, `dev`, `sv`, `ch` not a non-empty array of at
    most 1,000 entries, members outside `ch`) still raise `ProtocolError`.
    ``decode_changes_lenient(payload, ...) -> LenientChanges`` accepts only `changes`.

Encoding (`schemas.encoding`) and the rejection codes (`schemas.codes`) are re-exported
here, so `codec.encode(...)` and `codec.INVALID` keep working.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal, TypeVar

import orjson
from pydantic import Field, ValidationError

from schemas.codes import (
    ALL_CODES,
    CLOCK_SKEW,
    DEVICE_DISABLED,
    DICTIONARY_UNKNOWN,
    ID_REUSED,
    INVALID,
    MALFORMED,
    PERMANENT_CODES,
    RECORD_TOO_LARGE,
    RULE_REJECTED,
    SCHEMA_VERSION,
    SCOPE_DENIED,
    SCOPE_MISMATCH,
    SERVER_ERROR,
    TOO_LARGE,
    TRANSIENT_CODES,
    TXN_ABORTED,
    TYPE_MISMATCH,
    UNKNOWN_COLLECTION,
    UNKNOWN_DEVICE,
    UNKNOWN_FIELD,
    UNKNOWN_TYPE,
    UNSUPPORTED_VERSION,
    WRONG_DEVICE,
    WRONG_STRATEGY,
    is_permanent,
)
from schemas.encoding import encode, encode_dict
from schemas.errors import ProtocolError
from schemas.payload import DEFAULT_MAX_DECOMPRESSED, DEFAULT_MAX_PAYLOAD, payload_text
from schemas.reasons import (
    MAX_REASON_CHARS,
    clip_reason,
    kind_of,
    member_path,
    show_text,
    validation_reason,
)
from schemas.wire import (
    ALL_TYPES,
    MAX_CHANGES_PER_BATCH,
    MAX_JSON_DEPTH,
    MAX_SAFE_INT,
    PROTOCOL_VERSION,
    Change,
    Changes,
    DeviceId,
    Incarnation,
    Message,
    SchemaVersion,
)

__all__ = [
    "ALL_CODES",
    "CLOCK_SKEW",
    "DEFAULT_MAX_DECOMPRESSED",
    "DEFAULT_MAX_PAYLOAD",
    "DEVICE_DISABLED",
    "DICTIONARY_UNKNOWN",
    "ID_REUSED",
    "INVALID",
    "MALFORMED",
    "MAX_MESSAGE_DEPTH",
    "MAX_REASON_CHARS",
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
    "BadChange",
    "LenientChanges",
    "ProtocolError",
    "decode",
    "decode_changes_lenient",
    "decode_lenient",
    "encode",
    "encode_dict",
    "is_permanent",
]

# --- limits -------------------------------------------------------------------------

# The deepest legitimate message carries a 32-level value 7 levels down
# (reject > rj > rejection > rec > cf > candidates > candidate > v): 39 levels.
MAX_MESSAGE_DEPTH: Final = MAX_JSON_DEPTH + 8
# The start of orjson's error for a document nested past its own limit (1,024 levels).
_ORJSON_DEPTH: Final = "depth limit exceeded"

# orjson reads integer literals up to 64 bits as int and larger ones as float; a float
# this large may thus be an integer literal out of range (checked precisely, rarely).
_SUSPECT_FLOAT: Final = float(2**63)

M = TypeVar("M", bound=Message)

# --- results of lenient decoding ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class BadChange:
    """One entry of a `changes` batch that is not a valid change."""

    index: int
    """Position of the entry in `ch` (0-based)."""
    n: int | None
    """The entry's change number when it is a valid one (1 <= n < 2^53), else None."""
    error: ProtocolError
    """Why (code `invalid`); the reason's path starts with ``ch.{index}``."""
    raw: Any = None
    """The entry as read: the server keeps a digest of it, so that its change number
    sent again with other content is `id_reused` (PROTOCOL.md §10.2)."""


@dataclass(frozen=True, slots=True)
class LenientChanges:
    """A `changes` batch split into its valid changes and its invalid entries."""

    dev: str
    sv: int
    changes: Changes | None
    """The batch with only its valid changes, in order; None when none is valid."""
    bad: tuple[BadChange, ...]
    """The invalid entries, in batch order; empty when every change is valid."""
    inc: str | None = None
    """The store incarnation the changes were written in (None: the legacy one)."""


class _ChangesEnvelope(Message):
    """A `changes` message whose changes are not looked at yet (lenient decoding)."""

    type: Literal["changes"] = "changes"
    dev: DeviceId
    sv: SchemaVersion
    ch: Annotated[list[Any], Field(min_length=1, max_length=MAX_CHANGES_PER_BATCH)]
    inc: Incarnation | None = None


# --- decoding -----------------------------------------------------------------------


def decode(
    payload: bytes | bytearray | memoryview,
    *,
    allowed: Mapping[str, type[Message]] | None = None,
    max_payload: int = DEFAULT_MAX_PAYLOAD,
    max_decompressed: int = DEFAULT_MAX_DECOMPRESSED,
) -> Message:
    """Decode one wire payload into its message, or raise `ProtocolError` (see module)."""
    data, doc = _parse(payload, max_payload, max_decompressed)
    model = _envelope(doc, allowed)
    problem = _scan(doc, 1, _Text(data))
    if problem is not None:
        raise ProtocolError(INVALID, problem)
    return _validate(model, doc)


def decode_lenient(
    payload: bytes | bytearray | memoryview,
    *,
    allowed: Mapping[str, type[Message]] | None = None,
    max_payload: int = DEFAULT_MAX_PAYLOAD,
    max_decompressed: int = DEFAULT_MAX_DECOMPRESSED,
) -> Message | LenientChanges:
    """Like `decode`, but a `changes` batch comes back as `LenientChanges` (see module)."""
    data, doc = _parse(payload, max_payload, max_decompressed)
    model = _envelope(doc, allowed)
    text = _Text(data)
    if model is not Changes:
        problem = _scan(doc, 1, text)
        if problem is not None:
            raise ProtocolError(INVALID, problem)
        return _validate(model, doc)

    # Fast path: the whole batch is valid.
    if _scan(doc, 1, text) is None:
        try:
            batch = Changes.model_validate(doc)
        except ValidationError:
            pass
        else:
            return LenientChanges(dev=batch.dev, sv=batch.sv, changes=batch, bad=(),
                                  inc=batch.inc)

    # Slow path: the envelope must be valid, then each change is judged on its own.
    envelope = _validate(_ChangesEnvelope, doc)
    for name, value in doc.items():
        if name != "ch":
            problem = _scan(value, 2, text, (name,))
            if problem is not None:
                raise ProtocolError(INVALID, problem)
    good: list[Change] = []
    bad: list[BadChange] = []
    for index, entry in enumerate(envelope.ch):
        path = ("ch", index)
        problem = _scan(entry, 3, text, path)
        if problem is None:
            try:
                good.append(Change.model_validate(entry))
                continue
            except ValidationError as exc:
                problem = validation_reason(exc, path)
        bad.append(BadChange(index, _change_number(entry), ProtocolError(INVALID, problem),
                             entry))
    changes: Changes | None = None
    if good:
        rest = {name: value for name, value in doc.items() if name != "ch"}
        changes = _validate(Changes, {**rest, "ch": good})
    return LenientChanges(dev=envelope.dev, sv=envelope.sv, changes=changes, bad=tuple(bad),
                          inc=envelope.inc)


def decode_changes_lenient(
    payload: bytes | bytearray | memoryview,
    *,
    max_payload: int = DEFAULT_MAX_PAYLOAD,
    max_decompressed: int = DEFAULT_MAX_DECOMPRESSED,
) -> LenientChanges:
    """Decode a `changes` batch leniently; any other type is `unknown_type`."""
    result = decode_lenient(
        payload,
        allowed={"changes": Changes},
        max_payload=max_payload,
        max_decompressed=max_decompressed,
    )
    if not isinstance(result, LenientChanges):  # pragma: no cover - allowed forbids it
        raise ProtocolError(UNKNOWN_TYPE, "expected a 'changes' message")
    return result


def _parse(payload: Any, max_payload: int, max_decompressed: int) -> tuple[bytes, Any]:
    """Steps 1-3: bytes -> (JSON text, JSON object)."""
    data = payload_text(payload, max_payload, max_decompressed)
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        if str(exc).startswith(_ORJSON_DEPTH):
            # orjson stops at 1,024 levels, before it could tell whether the rest is
            # JSON: the depth limit (§3) is what was broken, whatever follows.
            raise ProtocolError(
                INVALID, f"message nested deeper than {MAX_MESSAGE_DEPTH} levels"
            ) from None
        raise ProtocolError(MALFORMED, clip_reason(f"not valid JSON: {exc}")) from None
    except Exception:  # pragma: no cover - orjson raises only JSONDecodeError
        raise ProtocolError(MALFORMED, "not valid JSON") from None
    if type(doc) is not dict:
        raise ProtocolError(MALFORMED, f"a message must be a JSON object, not {kind_of(doc)}")
    return data, doc


def _envelope(doc: dict[str, Any], allowed: Mapping[str, type[Message]] | None) -> type[Message]:
    """Steps 4-6: version, type and batch size; returns the model to validate with."""
    if "v" not in doc:
        raise ProtocolError(INVALID, "v: member missing (the protocol version, 1)")
    version = doc["v"]
    if type(version) is not int or version != PROTOCOL_VERSION:
        shown = repr(version) if type(version) is int and abs(version) < 10**9 else kind_of(version)
        raise ProtocolError(
            UNSUPPORTED_VERSION, f"v: version {shown} is not supported (only {PROTOCOL_VERSION})"
        )
    if "type" not in doc:
        raise ProtocolError(INVALID, "type: member missing")
    name = doc["type"]
    types = ALL_TYPES if allowed is None else allowed
    if type(name) is not str:
        raise ProtocolError(UNKNOWN_TYPE, f"type: must be a string, not {kind_of(name)}")
    model = types.get(name)
    if model is None:
        raise ProtocolError(UNKNOWN_TYPE, f"type: {show_text(name)} is not accepted here")
    if name == "changes":
        batch = doc.get("ch")
        if type(batch) is list and len(batch) > MAX_CHANGES_PER_BATCH:
            raise ProtocolError(
                TOO_LARGE,
                f"ch: {len(batch)} changes in one batch, at most {MAX_CHANGES_PER_BATCH}; "
                "split the batch",
            )
    return model


def _validate(model: type[M], doc: Any) -> M:
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        raise ProtocolError(INVALID, validation_reason(exc, ())) from None
    except ProtocolError:  # pragma: no cover - validators raise ValueError
        raise
    except Exception as exc:  # pragma: no cover - defensive: never leak another type
        reason = clip_reason(f"cannot validate: {type(exc).__name__}")
        raise ProtocolError(INVALID, reason) from None


def _change_number(entry: Any) -> int | None:
    if type(entry) is dict:
        n = entry.get("n")
        if type(n) is int and 1 <= n <= MAX_SAFE_INT:
            return n
    return None


# --- the number / depth scan (step 7) -----------------------------------------------


class _Text:
    """The JSON text of one message, with its too-large integer literals found lazily."""

    __slots__ = ("_data", "_huge")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._huge: frozenset[float] | None = None

    def huge(self) -> frozenset[float]:
        """Computed once per message, however many changes a lenient decode scans."""
        if self._huge is None:
            self._huge = _huge_int_literals(self._data)
        return self._huge


def _scan(value: Any, depth: int, text: _Text, path: tuple[str | int, ...] = ()) -> str | None:
    """Why `value` (at `depth`, reached by `path`) breaks the number or depth limits.

    A fast pass without paths handles the usual clean message; only a suspect message
    is walked again in document order to name the first offending path.
    """
    verdict = _fast_scan(value, depth)
    if verdict is True:
        return None
    huge: frozenset[float] = frozenset()
    if verdict is None:  # only suspiciously large floats: were they integer literals?
        huge = text.huge()
        if not huge:
            return None
    for where, problem in _slow_scan(value, depth, path, huge):
        return clip_reason(f"{member_path(where)}: {problem}" if where else problem)
    return None  # the large floats here were float literals, not integers


def _fast_scan(root: Any, depth: int) -> bool | None:
    """True: clean. False: a definite problem. None: only large floats to look at."""
    if type(root) is not dict and type(root) is not list:
        if type(root) is int:
            return -MAX_SAFE_INT <= root <= MAX_SAFE_INT
        if type(root) is float and abs(root) >= _SUSPECT_FLOAT:
            return None
        return True
    # Depth as in `json_depth`: the root is at `depth`, a member one level deeper. Only
    # non-empty containers are queued; one at level L has members at L + 1.
    if not root:
        return depth <= MAX_MESSAGE_DEPTH
    todo: list[tuple[Any, int]] = [(root, depth)]
    suspect = False
    while todo:
        item, level = todo.pop()
        if level >= MAX_MESSAGE_DEPTH:
            return False
        for value in item.values() if type(item) is dict else item:
            kind = type(value)
            if kind is dict or kind is list:
                if value:
                    todo.append((value, level + 1))
            elif kind is int:
                if value > MAX_SAFE_INT or value < -MAX_SAFE_INT:
                    return False
            elif kind is float and (value >= _SUSPECT_FLOAT or value <= -_SUSPECT_FLOAT):
                suspect = True
    return None if suspect else True


def _slow_scan(
    root: Any, depth: int, path: tuple[str | int, ...], huge: frozenset[float]
) -> Iterator[tuple[tuple[str | int, ...], str]]:
    """Every (path, problem) in document order."""
    todo: list[tuple[Any, int, tuple[str | int, ...]]] = [(root, depth, path)]
    while todo:
        value, level, where = todo.pop()
        kind = type(value)
        if kind is dict or kind is list:
            if level >= MAX_MESSAGE_DEPTH + (0 if value else 1):
                yield where, f"message nested deeper than {MAX_MESSAGE_DEPTH} levels"
                continue
            items: Iterable[tuple[str | int, Any]] = (
                value.items() if kind is dict else enumerate(value)
            )
            children = [(child, level + 1, (*where, key)) for key, child in items]
            todo.extend(reversed(children))
        elif kind is int:
            if value > MAX_SAFE_INT or value < -MAX_SAFE_INT:
                yield where, "integer outside the signed 53-bit range (|x| < 2^53)"
        elif kind is float and value in huge:
            yield where, "integer outside the signed 53-bit range (|x| < 2^53)"


class _HugeInt(Exception):
    pass


def _huge_int_literals(data: bytes) -> frozenset[float]:
    """The float values orjson gave to integer literals too large for 64 bits."""
    found: set[float] = set()

    def parse_int(text: str) -> int:
        digits = text.lstrip("-")
        if len(digits) > 16:
            number = int(text)
            if abs(number) > MAX_SAFE_INT:
                found.add(float(number))
        return 0

    try:
        json.loads(data.decode("utf-8"), parse_int=parse_int)
    except Exception:  # pragma: no cover - orjson accepted the same text
        return frozenset()
    return frozenset(found)
