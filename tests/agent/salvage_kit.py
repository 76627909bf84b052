"""Helpers of the `agent salvage` tests: an old store with every kind of pending change
(real writes through the agent), moved aside as an operator does, and what it held."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from agent.api import Agent
from agent.store import ENV_DIRNAME
from schemas import wire
from schemas.collection import Catalog
from tests.agent.agentkit import compact_in_place, rec
from tests.agent.atrest_kit import cfg_for
from tests.cli.procs import clean_env, run_cli

SCOPE = "route-42"


def build_old(data_dir: Path, catalog: Catalog, *, key: Path | None = None, puts: int = 150,
              acked: int = 0, compact: bool = True) -> dict[str, Any]:
    """Write a store under `data_dir` with pending changes of every kind (puts of three
    priorities, an increment, set adds and a remove of its own add, a delete, a
    manual field, a record of another scope, a two-change transaction); `acked` of the
    first changes acknowledged by the "server" (moved to the journal). Returns
    {"pending": {n: outbox entry}, "views": {"c/k": fields}}."""
    with Agent.open(cfg_for(data_dir, key), catalog) as ag:
        ag.sync.apply_delta(wire.Delta(d=[rec(f"s-{i}", i + 1, {"route": SCOPE,
                                                                 "notes": "y" * 150})
                                          for i in range(40)]))
        for i in range(puts):
            ag.put("tasks", f"t-{i}", {"route": SCOPE, "notes": f"note {i} " + "x" * 150},
                   priority=i % 3)
        if acked:
            ag.sync.apply_ack(wire.Ack(ok=[(n, SCOPE, 1000 + n) for n in range(1, acked + 1)]))
        ag.increment("tasks", "t-0", "attempts", 2)
        ag.add("tasks", "t-1", "labels", ["fragile", "heavy"])
        ag.remove("tasks", "t-1", "labels", ["fragile"])
        ag.delete("tasks", "t-2")
        ag.put("tasks", "t-3", {"address": "Main St 1"})
        ag.put("inspections", "i-1", {"vehicle": "v-9", "odometer": 120})
        with ag.transaction() as tx:
            tx.put("tasks", "tx-1", {"route": SCOPE, "status": "open"})
            tx.put("tasks", "tx-2", {"route": SCOPE, "status": "open"})
        pending = {e["ch"]["n"]: e for e in ag.pending()}
        views = {}
        for c, k in {(e["ch"]["c"], e["ch"]["k"]) for e in pending.values()}:
            got = ag.get(c, k, include_deleted=True)
            views[f"{c}/{k}"] = None if got is None else (got.deleted, got.fields)
    if compact:
        compact_in_place(data_dir)
    return {"pending": pending, "views": views}


def move_aside(data_dir: Path) -> Path:
    """What deploy/README.md says: move the store aside, keep the rest of data_dir."""
    moved = data_dir / "agent.lmdb.damaged-2026-01-31"
    shutil.move(str(data_dir / ENV_DIRNAME), str(moved))
    return moved


def config(data_dir: Path, *, device: str = "van-1", key: Path | None = None) -> Path:
    from schemas.collection import example_catalog_path

    path = data_dir / f"agent-{device}.toml"
    text = (f'device_id = "{device}"\nscopes = ["route-42", "depot-7", "fleet"]\n'
            f'data_dir = "{data_dir}"\nschema_file = "{example_catalog_path()}"\n')
    if key is not None:
        text += f'[storage]\nencryption_key_file = "{key}"\n'
    path.write_text(text + '[mqtt]\nhost = "127.0.0.1"\nport = 1\n', encoding="utf-8")
    return path


def salvage(data_dir: Path, old: Path | str, *args: str,
            cfg: Path | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli(data_dir, clean_env(), "agent", "salvage", str(old), "--config",
                   str(cfg or config(data_dir)), *args, timeout=300)


def salvage_json(data_dir: Path, old: Path, *args: str) -> dict[str, Any]:
    result = salvage(data_dir, old, *args, "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def digest_dir(path: Path) -> dict[str, str]:
    """Every file of a directory and its content's hash (nothing may be written)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(path.iterdir())}


def same_change(old: dict[str, Any], new: dict[str, Any], moved: dict[int, int]) -> bool:
    """`new` (an outbox entry of the current store) queues `old` again: same record,
    operation and values, the original stamp, base, priority and creation time; set
    removes name the salvaged add's new id in place of the old one."""
    o, n = old["ch"], new["ch"]
    removes = {f: {m: sorted(f"van-1:{moved.get(int(t.split(':')[1]), int(t.split(':')[1]))}"
                              for t in tags) for m, tags in rm.items()}
               for f, rm in (o.get("r") or {}).items()}
    return (all(o.get(m) == n.get(m) for m in ("c", "k", "s", "op", "h", "b", "f", "i", "a"))
            and removes == (n.get("r") or {}) and old["p"] == new["p"]
            and old["t"] == new["t"])


__all__ = ["SCOPE", "build_old", "config", "digest_dir", "move_aside", "salvage",
           "salvage_json", "same_change"]
