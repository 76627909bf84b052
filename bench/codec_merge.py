"""Per-message cost of the wire codec and of merging one change.

For change batches of 1, 20 and 200 changes (each change a ~300-byte task update):
encode (model -> bytes), decode (bytes -> validated model), and the same bytes through
plain `orjson.loads` / `orjson.dumps` as the raw limit, measured in the same run.
Then the cost of merging one change into a record, per strategy.

    .venv/bin/python -m bench.codec_merge [--quick]
"""

from __future__ import annotations

import argparse
import sys

import orjson

from bench.common import print_table, time_per_call, write_json
from schemas import codec, wire
from schemas.collection import example_catalog_path, load_catalog
from waystation import merge
from waystation.hlc import Clock


def make_batch(size: int) -> wire.Changes:
    clock = Clock("van-12", now_ms=lambda: 1_764_000_000_000)
    changes = []
    for n in range(1, size + 1):
        stamp = clock.tick()
        changes.append(wire.Change.model_validate({
            "n": n, "h": stamp.time_part(), "c": "tasks", "k": f"task-2026-{n:06d}",
            "s": "route-42", "b": 1188 + n, "op": "put",
            "f": {"status": "delivered", "customer": "Hendrikse Bakery & Co",
                  "address": f"Keizersgracht {n}, 1015 Amsterdam",
                  "notes": "Left with neighbour at no. 14, signed by J. de Vries; gate code 4471.",
                  "eta": 1_764_000_000_000 + n * 60_000},
            "i": {"attempts": 1},
        }))
    return wire.Changes(dev="van-12", sv=1, ch=changes)


def bench_codec(quick: bool) -> list[dict[str, float]]:
    rows = []
    min_time = 0.2 if quick else 0.6
    for size in (1, 20, 200):
        msg = make_batch(size)
        payload = codec.encode(msg)
        as_obj = orjson.loads(payload)
        t_encode = time_per_call(lambda msg=msg: codec.encode(msg), min_time=min_time)
        t_decode = time_per_call(lambda p=payload: codec.decode(p), min_time=min_time)
        t_loads = time_per_call(lambda p=payload: orjson.loads(p), min_time=min_time)
        t_dumps = time_per_call(lambda o=as_obj: orjson.dumps(o), min_time=min_time)
        compressed = codec.encode(msg, compress_over=512)
        rows.append({
            "changes": size, "bytes": len(payload), "bytes_zlib": len(compressed),
            "encode_us": t_encode * 1e6, "decode_us": t_decode * 1e6,
            "orjson_dumps_us": t_dumps * 1e6, "orjson_loads_us": t_loads * 1e6,
            "per_change_roundtrip_us": (t_encode + t_decode) * 1e6 / size,
            "raw_per_change_roundtrip_us": (t_dumps + t_loads) * 1e6 / size,
        })
    return rows


def bench_merge(quick: bool) -> list[dict[str, float | str]]:
    catalog = load_catalog(example_catalog_path())
    spec = catalog.collections["tasks"]
    clock = Clock("van-12", now_ms=lambda: 1_764_000_000_000)
    base = wire.Change.model_validate({
        "n": 1, "h": clock.tick().time_part(), "c": "tasks", "k": "t-1", "s": "route-42",
        "op": "put", "f": {"route": "route-42", "status": "pending", "customer": "A",
                           "address": "Dock 1", "notes": "-"}, "i": {"attempts": 1},
        "a": {"labels": ["fragile"]}})
    record = merge.apply_change(None, base, "van-12", 1, spec).record
    cases = {
        "lww put, 4 fields": {"f": {"status": "delivered", "customer": "B", "notes": "ok",
                                    "eta": 5}},
        "counter increment": {"i": {"attempts": 1}},
        "set add": {"a": {"labels": ["cold"]}},
        "manual concurrent": {"f": {"address": "Dock 9"}},
    }
    rows: list[dict[str, float | str]] = []
    min_time = 0.2 if quick else 0.6
    for name, body in cases.items():
        change = wire.Change.model_validate({
            "n": 2, "h": clock.tick().time_part(), "c": "tasks", "k": "t-1",
            "s": "route-42", "b": 0, "op": "put", **body})
        dev = "van-7" if name == "manual concurrent" else "van-12"
        t = time_per_call(lambda c=change, d=dev: merge.apply_change(record, c, d, 2, spec),
                          min_time=min_time)
        rows.append({"case": name, "merge_us": t * 1e6})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter timing runs")
    args = parser.parse_args(argv)
    codec_rows = bench_codec(args.quick)
    print_table(
        "Change batch: encode + decode + validate vs plain orjson (µs per message)",
        ["changes", "bytes", "zlib bytes", "encode", "decode+validate", "orjson.dumps",
         "orjson.loads", "µs/change (ours)", "µs/change (orjson)"],
        [[r["changes"], r["bytes"], r["bytes_zlib"], r["encode_us"], r["decode_us"],
          r["orjson_dumps_us"], r["orjson_loads_us"], r["per_change_roundtrip_us"],
          r["raw_per_change_roundtrip_us"]] for r in codec_rows])
    merge_rows = bench_merge(args.quick)
    print_table("Merging one change into a record (µs)", ["case", "µs"],
                [[r["case"], r["merge_us"]] for r in merge_rows])
    write_json("codec_merge", {"codec": codec_rows, "merge": merge_rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
