"""Property tests of schemas.codec: whatever the bytes, decode answers a Message or a
ProtocolError, and every valid message survives encode/decode exactly."""

from __future__ import annotations

import json
import operator
import os
import re
import zlib
from collections.abc import Callable
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.codec import (
    ALL_CODES,
    MAX_REASON_CHARS,
    LenientChanges,
    ProtocolError,
    decode,
    decode_lenient,
    encode,
)
from schemas.wire import (
    ALL_TYPES,
    CHANGE_ID_PATTERN,
    COLLECTION_PATTERN,
    FIELD_PATTERN,
    ID_PATTERN,
    MAX_SAFE_INT,
    STAMP_PATTERN,
    TIME_PART_PATTERN,
    Ack,
    Candidate,
    Catchup,
    CertIssued,
    Change,
    Changes,
    Checkpoint,
    Command,
    Csr,
    Delta,
    ErrorInfo,
    Fetch,
    Fetched,
    FetchedQuery,
    FetchQuery,
    FieldFilter,
    Hello,
    Message,
    Page,
    Rec,
    Reject,
    Rejection,
    SchemaPush,
    ServerState,
    Status,
    Welcome,
)

# WAYSTATION_FUZZ_EXAMPLES=20000 runs a deeper fuzz on demand; the default keeps it fast.
FUZZ = settings(
    max_examples=int(os.environ.get("WAYSTATION_FUZZ_EXAMPLES", "300")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# The batch test draws a whole batch and mutates several changes per example, so it costs
# about six times the others (19 s of 300 examples under coverage on the CI machine): 100
# keep every mutation kind hit many times; WAYSTATION_FUZZ_EXAMPLES raises it with the rest.
BATCH_FUZZ = settings(FUZZ, max_examples=int(os.environ.get("WAYSTATION_FUZZ_EXAMPLES", "100")))


def check_decode(payload: bytes) -> Message | None:
    """Decode `payload` and check the contract: a Message or a well-formed ProtocolError.

    An accepted message must re-encode to bytes that decode to an equal message, and
    lenient decoding must agree with strict decoding.
    """
    try:
        msg = decode(payload)
    except ProtocolError as err:
        assert err.code in ALL_CODES
        assert 0 < len(err.reason) < MAX_REASON_CHARS
        msg = None
    else:
        assert isinstance(msg, Message)
        assert decode(encode(msg)) == msg
    try:
        lenient = decode_lenient(payload)
    except ProtocolError as err:
        assert err.code in ALL_CODES
        assert 0 < len(err.reason) < MAX_REASON_CHARS
        assert msg is None
    else:
        if isinstance(lenient, LenientChanges):
            kept = len(lenient.changes.ch) if lenient.changes is not None else 0
            assert kept + len(lenient.bad) >= 1
            assert all(b.error.code == "invalid" for b in lenient.bad)
            if msg is not None:
                assert lenient.changes == msg and lenient.bad == ()
            else:
                assert lenient.bad
        else:
            assert lenient == msg
    return msg


# --- (c) strategies of valid messages -------------------------------------------------

LOWER = "abcdefghijklmnopqrstuvwxyz"
ALNUM = LOWER + LOWER.upper() + "0123456789"


def identifiers(first: str, rest: str) -> st.SearchStrategy[str]:
    """Strings of one character of `first` then up to 63 of `rest` (cheaper than regex)."""
    return st.builds(operator.add, st.sampled_from(first), st.text(rest, max_size=63))


ids = identifiers(ALNUM, ALNUM + "_.-")
pems = st.text(st.characters(codec="utf-8"), min_size=1, max_size=300)
collections = identifiers(LOWER, LOWER + "0123456789_")
field_names = identifiers(ALNUM[:52] + "_", ALNUM + "_")
time_parts = st.text("0123456789abcdef", min_size=16, max_size=16)
stamps = st.builds(lambda t, node: f"{t}:{node}", time_parts, ids | st.just("~server"))
tags = st.builds(lambda dev, n: f"{dev}:{n}", ids, st.integers(1, MAX_SAFE_INT))
numbers = st.integers(1, MAX_SAFE_INT)
seqs = st.integers(0, MAX_SAFE_INT)
text = st.text(st.characters(codec="utf-8"), max_size=20)
keys = st.text(st.characters(min_codepoint=0x20, codec="utf-8"), min_size=1, max_size=50)
members = st.text(st.characters(codec="utf-8"), min_size=1, max_size=50)
safe_ints = st.integers(-MAX_SAFE_INT, MAX_SAFE_INT)
finite_floats = st.floats(allow_nan=False, allow_infinity=False)
json_values = st.recursive(
    st.none() | st.booleans() | safe_ints | finite_floats | text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=12,
)


@st.composite
def recs(draw: st.DrawFn) -> Rec:
    deleted = draw(st.booleans())
    fields = draw(st.lists(field_names, unique=True, max_size=4))
    return Rec(
        c=draw(collections),
        k=draw(keys),
        s=draw(ids),
        q=draw(seqs),
        part=draw(st.booleans()),
        x=deleted,
        xh=draw(stamps) if deleted else draw(st.none() | stamps),
        f={} if deleted else {name: draw(json_values) for name in fields},
        h={name: draw(stamps) for name in fields[:2]},
        t={
            name: draw(st.dictionaries(members, st.lists(tags, max_size=3), max_size=2))
            for name in fields[2:3]
        },
        cf={
            name: draw(st.lists(st.builds(Candidate, v=json_values, by=ids, h=stamps), max_size=3))
            for name in fields[3:]
        },
    )


@st.composite
def changes_(draw: st.DrawFn) -> Change:
    common: dict[str, Any] = {
        "n": draw(numbers),
        "h": draw(time_parts),
        "c": draw(collections),
        "k": draw(keys),
        "s": draw(ids),
        "b": draw(seqs),
    }
    if draw(st.booleans()):
        return Change(op="del", **common)
    names = draw(st.lists(field_names, unique=True, min_size=1, max_size=6))
    f: dict[str, Any] = {}
    i: dict[str, int | float] = {}
    a: dict[str, list[str]] = {}
    r: dict[str, dict[str, list[str]]] = {}
    increments = safe_ints.filter(bool) | finite_floats.filter(bool)
    for name in names:
        kind = draw(st.sampled_from("fiar"))
        if kind == "f":
            f[name] = draw(json_values)
        elif kind == "i":
            i[name] = draw(increments)
        else:
            added = draw(st.lists(members, unique=True, min_size=1, max_size=4))
            split = draw(st.integers(0, len(added)))
            if kind == "a" or split == len(added):
                a[name] = added
            else:
                if split:
                    a[name] = added[:split]
                r[name] = {m: draw(st.lists(tags, max_size=3)) for m in added[split:]}
    return Change(op="put", f=f, i=i, a=a, r=r, **common)


reqs = st.text(st.characters(codec="utf-8"), min_size=1, max_size=64)
short = st.text(st.characters(codec="utf-8"), max_size=64)
codes = st.sampled_from(sorted(ALL_CODES)) | st.text(
    st.characters(codec="utf-8"), min_size=1, max_size=64
)
opt = st.none

cap_lists = st.lists(st.from_regex(r"[a-z][a-z0-9_]{0,31}", fullmatch=True), max_size=32)

filter_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**53) + 1, 2**53 - 1),
                           st.floats(allow_nan=False, allow_infinity=False),
                           st.text(st.characters(codec="utf-8"), max_size=8))
filter_ops = st.one_of(
    filter_scalars.map(lambda v: FieldFilter(eq=v)),
    st.lists(filter_scalars, min_size=1, max_size=3).map(
        lambda vs: FieldFilter.model_validate({"in": vs})),
    st.dictionaries(st.sampled_from(["gt", "gte", "lt", "lte"]),
                    filter_scalars.filter(lambda v: v is not None), min_size=1,
                    max_size=2).map(FieldFilter.model_validate),
    st.text(st.characters(codec="utf-8"), max_size=8).map(lambda p: FieldFilter(prefix=p)),
)

BY_TYPE: dict[type[Message], st.SearchStrategy[Message]] = {
    Hello: st.builds(
        Hello,
        dev=ids,
        agent=st.text(st.characters(codec="utf-8"), max_size=128),
        sv=seqs,
        z=st.booleans(),
        done=st.lists(
            st.text(st.characters(codec="utf-8"), min_size=1, max_size=64),
            max_size=3,
        ),
        caps=opt() | cap_lists,
        zd=opt() | st.integers(0, 2**32 - 1),
        crt=opt() | ids,
        cexp=opt() | seqs,
    ),
    Changes: st.builds(Changes, dev=ids, sv=seqs, ch=st.lists(changes_(), min_size=1, max_size=4)),
    Catchup: st.builds(
        Catchup,
        dev=ids,
        req=reqs,
        cp=st.dictionaries(ids, seqs, max_size=3),
        snap=st.lists(ids, max_size=3),
        lim=st.integers(1, 5000),
    ),
    Ack: st.builds(
        Ack,
        ok=st.lists(st.tuples(numbers, ids, seqs), max_size=3),
        fx=st.lists(recs(), max_size=2),
        rs=st.lists(numbers, max_size=3),
    ),
    Reject: st.builds(
        Reject,
        rj=st.lists(
            st.builds(
                Rejection,
                n=numbers,
                code=codes,
                reason=short,
                perm=st.booleans(),
                rec=opt() | recs(),
            ),
            max_size=2,
        ),
        err=opt() | st.builds(ErrorInfo, code=codes, reason=short),
    ),
    Delta: st.builds(Delta, d=st.lists(recs(), max_size=2)),
    Page: st.builds(
        lambda req, s, frm, to, reset, more, rs: Page.model_validate(
            {"req": req, "s": s, "from": frm, "to": to, "reset": reset, "more": more, "recs": rs}
        ),
        reqs,
        ids,
        seqs,
        seqs,
        st.booleans(),
        st.booleans(),
        st.lists(recs(), max_size=2),
    ),
    Checkpoint: st.builds(
        Checkpoint,
        req=reqs,
        cp=st.dictionaries(ids, seqs, max_size=3),
        denied=st.lists(ids, max_size=3),
    ),
    Fetch: st.builds(Fetch, dev=ids, req=reqs, c=collections,
                     k=st.lists(keys, min_size=1, max_size=100)),
    Fetched: st.builds(Fetched, req=reqs, c=collections, recs=st.lists(recs(), max_size=2),
                       miss=st.lists(keys, max_size=5)),
    FetchQuery: st.builds(FetchQuery, dev=ids, req=reqs, c=collections, w=st.dictionaries(
        st.from_regex(r"\$scope|[A-Za-z_][A-Za-z0-9_]{0,15}", fullmatch=True),
        filter_ops, max_size=3), lim=st.integers(1, 1000), after=opt() | keys),
    FetchedQuery: st.builds(
        FetchedQuery, req=reqs, c=collections, recs=st.lists(recs(), max_size=2),
        end=st.booleans(), next=opt() | keys, stop=st.sampled_from([None, "limit", "budget"]),
        scanned=st.integers(0, 10**6),
        err=opt() | st.builds(ErrorInfo, code=codes, reason=short)),
    Command: st.builds(
        Command,
        id=st.text(st.characters(codec="utf-8"), min_size=1, max_size=64),
        cmd=st.sampled_from(["wipe", "resync", "ping", "scopes", "sync", "creds",
                             "cert_renew"]),
        args=st.dictionaries(text, json_values, max_size=3),
    ),
    Welcome: st.builds(Welcome, caps=cap_lists,
                       srv=st.text(st.characters(codec="utf-8"), max_size=128)),
    Status: st.builds(
        Status,
        dev=ids,
        on=st.booleans(),
        agent=opt() | st.text(st.characters(codec="utf-8"), max_size=128),
        sv=opt() | seqs,
        t=opt() | seqs,
        pend=opt() | seqs,
        old=opt() | seqs,
        dl=opt() | seqs,
    ),
    ServerState: st.builds(ServerState, grp=ids, srv=ids, on=st.booleans(), t=opt() | seqs),
    Csr: st.builds(Csr, dev=ids, rid=ids, csr=pems),
    CertIssued: st.builds(CertIssued, rid=ids, cert=pems, ca=pems),
    SchemaPush: st.builds(SchemaPush, sv=seqs,
                          text=st.text(st.characters(codec="utf-8"), min_size=1, max_size=300)),
}
messages: st.SearchStrategy[Message] = st.one_of(*BY_TYPE.values())


@FUZZ
@given(messages, st.sampled_from([None, 0, 64, 512]))
def test_valid_messages_round_trip_exactly(msg: Message, compress_over: int | None) -> None:
    """Every valid message decodes back equal (also compressed) and re-encodes identically."""
    data = encode(msg, compress_over=compress_over)
    back = decode(data)
    assert back == msg and type(back) is type(msg)
    assert encode(back, compress_over=compress_over) == data
    assert decode(encode(msg)) == msg
    if isinstance(msg, Changes):
        lenient = decode_lenient(data)
        assert isinstance(lenient, LenientChanges)
        assert lenient.changes == msg and lenient.bad == ()


def test_strategies_cover_every_message_type() -> None:
    """The valid-message strategy has a branch for every wire type."""
    assert set(BY_TYPE) == set(ALL_TYPES.values())


@FUZZ
@given(ids, collections, field_names, time_parts, stamps, tags)
def test_identifier_strategies_match_the_patterns(
    dev: str, coll: str, field: str, time: str, stamp: str, tag: str
) -> None:
    """The hand-built identifier strategies only produce what the wire patterns accept."""
    for value, pattern in [
        (dev, ID_PATTERN),
        (coll, COLLECTION_PATTERN),
        (field, FIELD_PATTERN),
        (time, TIME_PART_PATTERN),
        (stamp, STAMP_PATTERN),
        (tag, CHANGE_ID_PATTERN),
    ]:
        assert re.fullmatch(pattern, value), (value, pattern)


# --- (a) random bytes -----------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes(payload: bytes) -> None:
    """Random bytes decode to a Message or raise ProtocolError, never anything else."""
    check_decode(payload)


@FUZZ
@given(st.binary(max_size=256))
def test_random_bytes_after_zlib_header(payload: bytes) -> None:
    """Random bytes behind a zlib header (0x78) or inside a zlib frame never crash."""
    check_decode(b"\x78" + payload)
    check_decode(b"\x78\x9c" + payload)
    check_decode(zlib.compress(payload))


# --- (b) mutations of valid messages --------------------------------------------------

ENVELOPE_NAMES = [
    "type",
    "v",
    "dev",
    "sv",
    "ch",
    "n",
    "op",
    "f",
    "i",
    "a",
    "r",
    "k",
    "h",
    "q",
    "from",
    "ok",
    "fx",
    "rj",
    "err",
    "cp",
    "req",
    "recs",
    "d",
    "x",
    "cf",
    "t",
]
wild_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.sampled_from([0, 1, -1, 2**53 - 1, 2**53, -(2**53), 2**63, 2**64, -(2**63) - 1])
    | st.floats()  # NaN and infinities render as NaN / Infinity literals
    | st.text(max_size=30)
    | st.sampled_from([*sorted(ALL_TYPES), "", "\x00", "\ud800", "é" * 101])
)
wild_values = st.recursive(
    wild_scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(ENVELOPE_NAMES) | st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=16,
)
deep_values = st.integers(1, 120).map(lambda d: json.loads("[" * d + "]" * d))


Draw = Callable[[st.SearchStrategy[Any]], Any]


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(doc, dict):
        for key, value in doc.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            out += _paths(value, (*prefix, index))
    return out


def _get(doc: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        doc = doc[part]
    return doc


def mutate_json(draw: Draw, doc: Any, *, root: bool = True) -> Any:
    """Apply one structural mutation at a random place of a parsed JSON document.

    With root=False the document itself is never replaced, only its members.
    """
    paths = _paths(doc) if root else _paths(doc)[1:]
    path = draw(st.sampled_from(paths))
    op = draw(st.sampled_from(["replace", "drop", "add", "deep", "dup"]))
    if not path:
        return draw(wild_values) if op == "replace" else doc
    parent = _get(doc, path[:-1])
    last = path[-1]
    if op == "replace":
        parent[last] = draw(wild_values)
    elif op == "deep":
        parent[last] = draw(deep_values)
    elif op == "drop":
        del parent[last]
    elif op == "dup" and isinstance(parent, list):
        parent.insert(last, parent[last])
    else:
        target = _get(doc, path)
        if isinstance(target, dict):
            target[draw(st.sampled_from(ENVELOPE_NAMES) | st.text(max_size=8))] = draw(wild_values)
        elif isinstance(target, list):
            target.insert(draw(st.integers(0, len(target))), draw(wild_values))
    return doc


def mutate_bytes(draw: Draw, data: bytes) -> bytes:
    """Flip, insert, delete or overwrite bytes of `data`."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "set"]))
        pos = draw(st.integers(0, len(buf)))
        if op == "insert" or not buf:
            buf[pos:pos] = draw(
                st.binary(min_size=1, max_size=8)
                | st.sampled_from(
                    [b"{", b"}", b"[", b'"', b",", b"\\u", b"99999999999999999999", b"-", b"\xff"]
                )
            )
        elif op == "delete":
            del buf[pos : pos + draw(st.integers(1, 8))]
        elif op == "flip":
            buf[min(pos, len(buf) - 1)] ^= 1 << draw(st.integers(0, 7))
        else:
            buf[min(pos, len(buf) - 1)] = draw(st.integers(0, 255))
    return bytes(buf)


def _dumps(doc: Any, escape: bool) -> bytes:
    """JSON text of `doc` allowing what orjson refuses (huge ints, NaN, lone surrogates)."""
    return json.dumps(doc, ensure_ascii=escape, allow_nan=True).encode("utf-8", "surrogatepass")


@FUZZ
@given(data=st.data())
def test_mutated_valid_messages(samples: dict[str, Message], data: st.DataObject) -> None:
    """Valid messages of every type, structurally or byte-wise mutated, never crash."""
    msg = data.draw(messages | st.sampled_from(list(samples.values())))
    payload = encode(msg)
    mode = data.draw(st.sampled_from(["json", "json", "bytes", "both", "zlib"]))
    if mode in ("json", "both"):
        doc = orjson.loads(payload)
        for _ in range(data.draw(st.integers(1, 3))):
            doc = mutate_json(data.draw, doc)
        payload = _dumps(doc, data.draw(st.booleans()))
    if mode in ("bytes", "both"):
        payload = mutate_bytes(data.draw, payload)
    if mode == "zlib":
        payload = mutate_bytes(data.draw, zlib.compress(payload))
    elif data.draw(st.booleans()):
        payload = zlib.compress(payload)
    check_decode(payload)


@BATCH_FUZZ
@given(st.data())
def test_mutated_changes_batches(data: st.DataObject) -> None:
    """Batches with some mutated changes split cleanly into good and bad changes."""
    batch = data.draw(
        st.builds(Changes, dev=ids, sv=seqs, ch=st.lists(changes_(), min_size=2, max_size=6))
    )
    doc = orjson.loads(encode(batch))
    hit = data.draw(st.sets(st.integers(0, len(doc["ch"]) - 1), min_size=1))
    for index in hit:
        if data.draw(st.integers(0, 5)) == 0:
            doc["ch"][index] = data.draw(wild_values)
        else:
            mutate_json(data.draw, doc["ch"][index], root=False)
    payload = _dumps(doc, data.draw(st.booleans()))
    check_decode(payload)
    try:
        result = decode_lenient(payload)
    except ProtocolError:
        return
    assert isinstance(result, LenientChanges)
    untouched = [c for index, c in enumerate(batch.ch) if index not in hit]
    kept = list(result.changes.ch) if result.changes is not None else []
    for good in untouched:
        assert good in kept
    assert {b.index for b in result.bad} <= hit
    for bad in result.bad:
        assert bad.error.reason.startswith(f"ch.{bad.index}")
