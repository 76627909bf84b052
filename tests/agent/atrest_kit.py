"""Helpers of the encryption-at-rest tests: a store with something in every database,
and a dump of everything in it (decoded) to compare before and after a conversion."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from agent.api import Agent
from agent.base import BaseRecord
from agent.keyring import KeyEncryptionKey
from agent.store import DB_NAMES, ENCRYPTED_DBS, Store, n_key, record_key
from schemas.collection import Catalog
from tests.agent.agentkit import make_cfg
from waystation.config import AgentConfig

SECRET = "secret-note-4711"


def cfg_for(data_dir: Path, key: Path | None = None) -> AgentConfig:
    cfg = make_cfg(data_dir)
    if key is None:
        return cfg
    return cfg.model_copy(update={"storage": cfg.storage.model_copy(
        update={"encryption_key_file": key})})


def fill(data_dir: Path, catalog: Catalog, key: Path | None = None, *, bulk: int = 300) -> None:
    """Real writes through the agent (records, pending changes), plus `bulk` entries in
    each encrypted database written straight into the store (base, stamps, conflicts,
    dead letters, more views), so that a conversion takes several batches."""
    with Agent.open(cfg_for(data_dir, key), catalog) as ag:
        for i in range(5):
            ag.put("tasks", f"t-{i}", {"route": "route-42", "notes": f"{SECRET} {i}"})
        store = ag._core.store

        def bulk_rows(tx: Any) -> None:
            model = tx.get("view", record_key("tasks", "t-0"))
            for i in range(bulk):
                k = f"b-{i:05d}"
                rk = record_key("tasks", k)
                tx.put("view", rk, {**model, "f": {**model["f"], "notes": f"{SECRET} {k}"}})
                doc, stamps = BaseRecord("tasks", k, "route-42", i + 1, f={"notes": SECRET},
                                         fq={"notes": i + 1},
                                         h={"notes": f"0190000000{i:02x}0000:van-7"}
                                         ).to_docs()
                tx.put("base", rk, doc)
                tx.put("stamps", rk, stamps)
                tx.put("conflicts", b"L" + n_key(i) + b"notes",
                       {"lost": f"{SECRET} lost {i}"})
                tx.put("deadletters", n_key(10_000 + i),
                       {"n": i, "code": "invalid", "reason": SECRET, "t": 1, "entry": {}})
                # An idempotency key's answer (agent.idempotency), sealed like the rest.
                ik = hashlib.sha256(f"app\0key-{i}".encode()).digest()
                tx.put("idem", ik, {"m": "POST", "p": "/x", "b": "-", "s": 202,
                                    "a": {"note": f"{SECRET} {i}"}, "t": 1})
                tx.put_raw("idem_t", (1).to_bytes(8, "big") + ik)
        store.write(bulk_rows)


def dump(data_dir: Path, key: Path | None) -> dict[str, list[tuple[bytes, Any]]]:
    """Every entry of every database, values decoded -- except what a conversion
    changes by design: the encryption token, and the query indexes (derived data, whose
    plain-text keys `encrypt` drops for the agent to rebuild)."""
    kek = None if key is None else KeyEncryptionKey.from_file(key)
    store = Store.open(data_dir, kek=kek, create=False)
    try:
        def run(tx: Any) -> dict[str, list[tuple[bytes, Any]]]:
            out: dict[str, list[tuple[bytes, Any]]] = {}
            for name in DB_NAMES:
                if name == "index":
                    continue
                if name in ENCRYPTED_DBS:
                    out[name] = list(tx.items(name))
                    continue
                with tx.cursor(name) as cur:
                    out[name] = [(bytes(k), bytes(v)) for k, v in cur
                                 if not (name == "meta" and k in (b"enc", b"idx"))]
            return out
        return store.read(run)
    finally:
        store.close()


def plain_values_visible(data_dir: Path) -> bool:
    return SECRET.encode() in (data_dir / "agent.lmdb" / "data.mdb").read_bytes()
