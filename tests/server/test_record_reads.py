"""Reading records for the operator (`server get/list/export`), on both stores.

Records are written by the real engine (the merge path devices use), so the stored form
is the one a server really keeps; the documents must carry the app's field names and
values, never the storage abbreviations.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import orjson
import pytest

from broker.errors import BadStoredRecord, RecordNotFound, UnknownCollection
from broker.server.record_docs import record_doc
from broker.server.record_reads import get_record, iter_records, list_page
from broker.server.store.base import Store, WriteTxn
from tests.server.helpers import CATALOG, T0, by_device, changes, hp, make_engine, oks


def _inventory(n: int, key: str, scope: str = "d1", **extra: object) -> dict[str, object]:
    ch: dict[str, object] = {"n": n, "h": hp(T0 + n), "c": "inventory", "k": key, "s": scope,
                             "b": 0, "op": "put", "f": {"depot": scope, "sku": key}}
    ch.update(extra)
    return ch


def _fill(tmp: Path, store: Store) -> None:
    engine, _, _ = make_engine(tmp, {"van-1": ["d1", "d2", "r1"]}, store=store)
    batch = [
        _inventory(1, "sku-b", i={"stock": 5}, a={"tags": ["cold", "fragile"]}),
        _inventory(2, "sku-a", "d2", f={"depot": "d2", "sku": "sku-a", "name": "Apples",
                                        "price": 1.5}),
        _inventory(3, "sku-c"),
        {"n": 4, "h": hp(T0 + 4), "c": "inventory", "k": "sku-c", "s": "d1", "b": 0,
         "op": "del"},
        {"n": 5, "h": hp(T0 + 5), "c": "tasks", "k": "t-1", "s": "r1", "b": 0, "op": "put",
         "f": {"route": "r1", "address": "1 Main St"}},
    ]
    out = by_device(engine.handle_up("van-1", changes("van-1", batch)))
    assert len(oks(out["van-1"])) == 5


def test_get_decodes_field_names_and_values(tmp_path: Path, store: Store) -> None:
    _fill(tmp_path, store)
    rec = get_record(store, CATALOG, "inventory", "sku-b")
    doc = record_doc(rec, CATALOG.collection("inventory"), detail=True)
    assert doc["collection"] == "inventory" and doc["key"] == "sku-b"
    assert doc["scope"] == "d1" and doc["deleted"] is False and doc["version"] >= 1
    assert doc["fields"] == {"depot": "d1", "sku": "sku-b", "stock": 5,
                             "tags": ["cold", "fragile"]}
    info = doc["field_info"]
    assert info["stock"]["merge"] == "counter" and info["stock"]["total"] == 5
    assert info["tags"]["merge"] == "set"
    assert info["sku"]["by"] == "van-1" and info["sku"]["change"] == 1
    assert doc["updated"].startswith("20")
    text = orjson.dumps(doc).decode()
    for abbreviation in ('"fv"', '"wh"', '"f":', '"q":'):
        assert abbreviation not in text


def test_get_deleted_record_is_marked(tmp_path: Path, store: Store) -> None:
    _fill(tmp_path, store)
    doc = record_doc(get_record(store, CATALOG, "inventory", "sku-c"))
    assert doc["deleted"] is True and doc["fields"] == {}
    assert doc["deleted_by"]["device"] == "van-1" and doc["deleted_by"]["change"] == 4


def test_get_unknown_key_and_collection(tmp_path: Path, store: Store) -> None:
    _fill(tmp_path, store)
    with pytest.raises(RecordNotFound, match="server list inventory") as exc:
        get_record(store, CATALOG, "inventory", "nope")
    assert exc.value.exit_code == 1
    with pytest.raises(UnknownCollection, match="no collection 'ghosts'") as exc2:
        get_record(store, CATALOG, "ghosts", "x")
    assert exc2.value.exit_code == 1


def test_list_orders_filters_and_pages(tmp_path: Path, store: Store) -> None:
    _fill(tmp_path, store)
    keys = [r.k for r in iter_records(store, "inventory")]
    assert keys == ["sku-a", "sku-b"]                      # deleted left out
    keys = [r.k for r in iter_records(store, "inventory", deleted=True)]
    assert keys == ["sku-a", "sku-b", "sku-c"]
    assert [r.k for r in iter_records(store, "inventory", scope="d2")] == ["sku-a"]
    assert [r.k for r in iter_records(store, "inventory", after="sku-a")] == ["sku-b"]
    first = list_page(store, "inventory", limit=1)
    assert [r.k for r in first.records] == ["sku-a"] and first.next_after == "sku-a"
    second = list_page(store, "inventory", limit=1, after=first.next_after)
    assert [r.k for r in second.records] == ["sku-b"] and second.next_after is None
    everything = [(r.c, r.k) for r in iter_records(store, None, page=2)]
    assert everything == [("inventory", "sku-a"), ("inventory", "sku-b"), ("tasks", "t-1")]


def test_records_after_pages_across_collections(store: Store) -> None:
    """The store primitive: byte-wise (collection, key) order, strictly after."""
    def fill(txn: WriteTxn) -> None:
        for c, k in [("a", "1"), ("a", "2"), ("ab", "0"), ("b", "1")]:
            txn.put_record(c, k, {"c": c, "k": k})
    store.transact(fill)
    with store.read() as txn:
        assert [(c, k) for c, k, _ in txn.records_after(None, None, 10)] == [
            ("a", "1"), ("a", "2"), ("ab", "0"), ("b", "1")]
        assert [(c, k) for c, k, _ in txn.records_after("a", None, 10)] == [
            ("a", "1"), ("a", "2")]
        assert [(c, k) for c, k, _ in txn.records_after("a", ("a", "1"), 10)] == [("a", "2")]
        assert txn.records_after("a", ("a", "2"), 10) == []
        assert [(c, k) for c, k, _ in txn.records_after(None, ("a", "2"), 1)] == [("ab", "0")]
        assert txn.records_after("zz", None, 10) == [] and txn.records_after(None, None, 0) == []
        state = txn.records_after("b", None, 1)[0][2]
        assert state == {"c": "b", "k": "1"}


def test_broken_stored_record_is_a_clear_error(store: Store) -> None:
    store.transact(lambda txn: txn.put_record("tasks", "t-9", {"fv": 99, "c": "tasks"}))
    with pytest.raises(BadStoredRecord, match=r"tasks/t-9 .* another version"):
        get_record(store, CATALOG, "tasks", "t-9")


def test_listing_memory_is_bounded(tmp_path: Path, store: Store) -> None:
    """Paging through 3,000 records (6 MB of values) holds one page at a time (100
    records, 200 kB), not the collection."""
    def fill(txn: WriteTxn) -> None:
        for i in range(3000):
            txn.put_record("tasks", f"t-{i:05d}", {
                "fv": 1, "c": "tasks", "k": f"t-{i:05d}", "s": "r1", "q": i + 1,
                "f": {"notes": ["r", i + 1, ["x" * 2000, f"{hp(T0 + i)}:van-1", i + 1]]}})
    store.transact(fill)
    tracemalloc.start()
    try:
        count = sum(1 for _ in iter_records(store, "tasks", page=100))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 3000
    assert peak < 2_000_000, peak   # a third of the collection's values
