"""MQTT payload bytes per change as the agent encodes them, for both record generators
(a benchmark, not a test; quick: seconds, no broker).

The device's own code builds the messages: `Agent.put` of N records, then the batches
the daemon would send (`Sync.next_batch` with the agent's default batch limits, encoded
by `Batch.payload` with its default `compress_over_bytes`) and single-change messages as
sent on an idle link. Two record generators from bench/device.py: `text` (names,
addresses and notes from a 91-word vocabulary, compressing well) and `random` (the same
fields and sizes, random letters: compressing badly). This counts MQTT payload bytes;
"device link" adds the MQTT 3.1.1 framing of a QoS-1 PUBLISH on the device's topics and
its PUBACK, both ways (TCP/IP headers not counted: bench/footprint.py measures through a
proxy). Each is measured without and with capability zd1 (schemas.zdict: the preset
dictionary, negotiated in hello/welcome; a v1 device gets the first column) and with zd2
(schemas.zdict_schema: up messages with the dictionary derived from the collection
schema, acks still with zd1's) and with zd3 (schemas.zdict_recent: the change messages
also with the device's last answered ones, through the agent's own `Sync.changes_payload`
as the daemon sends them); the rows also give the device link with the topic prefix `w`
instead of `waystation` (`[mqtt] prefix`, an operator's choice).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from typing import Any

import orjson

from agent.api import Agent
from bench.common import print_table, write_json
from bench.device import RECORDS
from schemas import codec, zdict, zdict_schema
from schemas.collection import example_catalog_path, load_catalog
from waystation.config import AgentConfig

SCOPE = "route-1"


UP_TOPIC = "waystation/van-1/up"
DOWN_TOPIC = "waystation/van-1/down"
SHORT_UP_TOPIC = "w/van-1/up"
SHORT_DOWN_TOPIC = "w/van-1/down"
MODES = ("v1", "zd1", "zd2", "zd3")


def mqtt_qos1(topic: str, payload: int) -> int:
    """Bytes of a QoS-1 PUBLISH (MQTT 3.1.1) carrying `payload` bytes, plus its PUBACK."""
    rest = 2 + len(topic.encode()) + 2 + payload
    length = 1 if rest < 128 else 2 if rest < 16384 else 3
    return 1 + length + rest + 4


def measure(kind: str, count: int, mode: str = "v1") -> dict[str, Any]:
    """Bytes per change for `count` records made by generator `kind`, `mode` `v1` (no
    capability), `zd1` (the preset dictionary both ways) or `zd2` (up with the schema's
    dictionary, down with zd1's)."""
    make = RECORDS[kind]
    catalog = load_catalog(example_catalog_path())
    zd = mode != "v1"
    up_zd: bool | bytes = zdict_schema.dictionary(catalog) if mode in ("zd2", "zd3") else zd
    with tempfile.TemporaryDirectory() as tmp:
        cfg = AgentConfig.model_validate({"device_id": "van-1", "data_dir": tmp,
                                          "scopes": [SCOPE]})
        sync_cfg = cfg.sync
        over = sync_cfg.compress_over_bytes or None
        with Agent.open(cfg, catalog, env={}) as ag:
            if mode == "zd3":  # the agent's own packing, as after a welcome agreeing it
                ag.sync.packing.hello_zd(catalog)
                ag.sync.packing.welcome(frozenset({"zd1", "zd2", "zd3"}))

            def payload(batch: Any) -> bytes:
                if mode == "zd3":
                    return ag.sync.changes_payload(batch, over)
                return bytes(batch.payload("van-1", compress_over=over, zdict=up_zd))

            record_json = 0
            for i in range(count):
                rec = make(SCOPE, i)
                record_json += len(orjson.dumps(rec))
                ag.put("tasks", f"t-{i:07d}", rec)
            # single changes on an idle link: each change is a message of its own
            singles = acks = link = short = values = recent = 0
            history: list[bytes] = []
            envelope: dict[str, float] = {}
            for i in range(min(count, 200)):
                batch = ag.sync.next_batch((), 1, sync_cfg.batch_max_bytes)
                up = len(payload(batch))
                ack = _ack(batch, i + 1)
                down = len(codec.encode(ack, compress_over=over, zdict=zd))
                singles += up
                acks += down
                link += mqtt_qos1(UP_TOPIC, up) + mqtt_qos1(DOWN_TOPIC, down)
                short += mqtt_qos1(SHORT_UP_TOPIC, up) + mqtt_qos1(SHORT_DOWN_TOPIC, down)
                if mode == "zd2":  # options weighed, not built (bench/README.md)
                    plain = batch.payload("van-1")
                    values += _values_only(plain)
                    recent += len(zdict.pack(plain, (up_zd if isinstance(up_zd, bytes) else b"")
                                             + b"".join(history[-4:])))
                    history.append(plain)
                    assert isinstance(up_zd, bytes)
                    for part, cost in _envelope_costs(plain, up_zd).items():
                        envelope[part] = envelope.get(part, 0) + cost
                ag.sync.apply_ack(ack)
                ag.sync.packing.answered(batch.numbers)
            # bulk: what is left, in the daemon's batches
            bulk = bulk_changes = messages = 0
            sent = min(count, 200)
            while True:
                batch = ag.sync.next_batch((), sync_cfg.batch_max_changes,
                                           sync_cfg.batch_max_bytes)
                if not batch:
                    break
                bulk += len(payload(batch))
                bulk_changes += len(batch)
                messages += 1
                ag.sync.apply_ack(_ack(batch, sent + 1))
                ag.sync.packing.answered(batch.numbers)
                sent += len(batch)
    return {"records": count, "record_json_bytes_avg": record_json / count,
            "single_changes": min(count, 200),
            "single_bytes_per_change": singles / min(count, 200),
            "single_ack_bytes": acks / min(count, 200),
            "single_device_link_bytes_both_ways": link / min(count, 200),
            "single_device_link_bytes_both_ways_prefix_w": short / min(count, 200),
            "zd1": zd, "mode": mode,
            **({"single_values_only_raw_deflate_bytes": values / min(count, 200),
                "single_with_last_4_changes_as_dictionary_bytes": recent / min(count, 200),
                "single_envelope_bytes_by_member": {
                    k: v / min(count, 200) for k, v in envelope.items()}}
               if mode == "zd2" else {}),
            "bulk_changes": bulk_changes, "bulk_messages": messages,
            "bulk_bytes_per_change": bulk / max(1, bulk_changes),
            "compress_over_bytes": sync_cfg.compress_over_bytes,
            "batch_max_changes": sync_cfg.batch_max_changes,
            "batch_max_bytes": sync_cfg.batch_max_bytes}


def _values_only(payload: bytes) -> int:
    """Raw deflate of the change's field values alone, concatenated as text: what no
    envelope, field name or zlib frame costs (a floor for any schema-fixed dictionary)."""
    import zlib

    change = orjson.loads(payload)["ch"][0]
    text = "".join(str(v) for v in change.get("f", {}).values()).encode()
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    return len(co.compress(text) + co.flush())


def _envelope_costs(payload: bytes, dictionary: bytes) -> dict[str, int]:
    """Bytes each envelope member costs in the zd2 stream (the stream's size with it
    minus without it), and the zlib frame (header, DICTID, adler-32) against raw
    deflate: what a compact envelope could save at most."""
    import zlib

    doc = orjson.loads(payload)

    def size(d: dict[str, Any], wbits: int = 15) -> int:
        co = zlib.compressobj(9, zlib.DEFLATED, wbits, 9, zlib.Z_DEFAULT_STRATEGY, dictionary)
        return len(co.compress(orjson.dumps(d)) + co.flush())

    full = size(doc)
    out = {"zlib_frame": full - size(doc, -15)}
    for name in ("inc", "dev"):
        out[name] = full - size({k: v for k, v in doc.items() if k != name})
    for name in ("h", "k", "n"):
        change = {k: v for k, v in doc["ch"][0].items() if k != name}
        out[f"ch.{name}"] = full - size({**doc, "ch": [change]})
    return out


def _ack(batch: Any, first_q: int) -> Any:
    from schemas import wire

    return wire.Ack(ok=[(n, SCOPE, first_q + i) for i, (n, _) in enumerate(batch)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=5000)
    parser.add_argument("--quick", action="store_true", help="1,000 records")
    args = parser.parse_args(argv)
    count = 1000 if args.quick else args.records
    results = {kind if mode == "v1" else f"{kind}+{mode}": measure(kind, count, mode)
               for kind in RECORDS for mode in MODES}
    print_table("MQTT payload bytes per change (the agent's encoding, default settings)",
                ["records", "record JSON B", "single change B", "its ack B",
                 "single, device link both ways B", "same, topic prefix w B",
                 "bulk B/change", "bulk messages"],
                [[kind, r["record_json_bytes_avg"], r["single_bytes_per_change"],
                  r["single_ack_bytes"], r["single_device_link_bytes_both_ways"],
                  r["single_device_link_bytes_both_ways_prefix_w"],
                  r["bulk_bytes_per_change"], r["bulk_messages"]]
                 for kind, r in results.items()])
    write_json("wire_bytes", {"records": count, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
