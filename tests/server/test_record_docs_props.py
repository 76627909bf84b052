"""Property tests of `broker.server.record_docs` (pure): the operator's document of any
record state carries exactly what an app reads, under the app's field names."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.server.record_docs import decode_state, iso_ms, matches, record_doc
from tests.server.helpers import CATALOG
from waystation import merge
from waystation.hlc import Stamp
from waystation.merge.state import Counter, RecordState, Register, SetField, Version

names = st.sampled_from(["sku", "name", "stock", "tags", "bin", "price", "extra"])
stamps = st.builds(Stamp, st.integers(1, 2**40), st.integers(0, 0xFFFF),
                   st.sampled_from(["van-1", "van-2", "~server"]))
values = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40),
                   st.sampled_from(["", "a", "Äpfel"]), st.lists(st.integers(0, 9), max_size=3))
quick = settings(max_examples=60, deadline=None)


@st.composite
def field_states(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(["r", "c", "s"]))
    q = draw(st.integers(1, 1000))
    if kind == "r":
        cf = tuple(draw(st.lists(st.builds(Version, values, stamps, st.just("van-2"),
                                           st.integers(1, 99)), max_size=2)))
        return Register(Version(draw(values), draw(stamps), "van-1", draw(st.integers(0, 99))),
                        q, cf, q if cf else 0)
    if kind == "c":
        return Counter(draw(st.integers(-1000, 1000)), q)
    tags = draw(st.dictionaries(st.sampled_from(["cold", "fragile", "big"]),
                                st.fixed_dictionaries({"van-1:1": stamps}), max_size=3))
    return SetField(tags, {}, q)


@st.composite
def records(draw: st.DrawFn) -> RecordState:
    fields = draw(st.dictionaries(names, field_states(), max_size=5))
    wh = draw(st.one_of(st.none(), stamps))
    xh = draw(st.one_of(st.none(), stamps))
    return RecordState("inventory", draw(st.sampled_from(["sku-a", "sku-b"])),
                       draw(st.sampled_from(["d1", "d2"])), draw(st.integers(1, 10**6)),
                       fields, xh, 5 if xh else 0, "van-2" if xh else "", 3 if xh else 0, wh)


@quick
@given(records(), st.booleans())
def test_doc_shows_what_the_app_reads(record: RecordState, detail: bool) -> None:
    doc = record_doc(record, CATALOG.collection("inventory"), detail=detail)
    orjson.dumps(doc)  # a JSON document
    assert doc["fields"] == record.values()
    assert doc["deleted"] == record.deleted
    assert (doc["collection"], doc["key"], doc["scope"], doc["version"]) == (
        record.c, record.k, record.s, record.q)
    if record.deleted:
        assert doc["fields"] == {} and doc["open_conflicts"] == []
        assert doc["deleted_by"]["device"] == "van-2"
    assert set(doc["open_conflicts"]) <= set(record.fields)
    if detail:
        assert set(doc["field_info"]) == set(record.fields)
        for name, info in doc["field_info"].items():
            spec = CATALOG.collections["inventory"].fields.get(name)
            assert info["merge"] == ("" if spec is None else spec.strategy)
    newest = merge.latest_stamp(record)
    assert doc["updated"] == ("" if newest is None else iso_ms(newest.wall))


@quick
@given(records())
def test_doc_survives_the_storage_form(record: RecordState) -> None:
    """The stored form (what the store hands back) decodes to the same document."""
    stored = orjson.loads(orjson.dumps(merge.to_json(record)))
    again = decode_state(stored, record.c, record.k)
    assert record_doc(again, detail=True) == record_doc(record, detail=True)


@quick
@given(records(), st.one_of(st.none(), st.sampled_from(["d1", "d2"])), st.booleans())
def test_matches_filters_by_scope_and_deletion(record: RecordState, scope: str | None,
                                               deleted: bool) -> None:
    shown = matches(record, scope=scope, deleted=deleted)
    assert shown == ((scope is None or record.s == scope) and (deleted or not record.deleted))


@given(st.integers(1, 2**45))
def test_iso_ms_keeps_milliseconds(ms: int) -> None:
    text = iso_ms(ms)
    assert text.endswith("Z") and text[-5:-1] == f"{ms % 1000:03d}"[-3:].rjust(4, ".")
