"""Helpers shared by the device agent's tests (imported by conftest and test modules)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import lmdb

from agent.api import Agent
from agent.store import ENV_DIRNAME, record_key
from agent.view import compute_view
from schemas import wire
from waystation.config import AgentConfig

SCOPES = ("route-42", "depot-7", "fleet")


class FakeClock:
    """A wall clock the test moves by hand (ms)."""

    def __init__(self, start_ms: int = 1_750_000_000_000) -> None:
        self.ms = start_ms

    def __call__(self) -> int:
        return self.ms

    def advance(self, seconds: float) -> None:
        self.ms += int(seconds * 1000)


def make_cfg(data_dir: Path, *, device: str = "van-1", scopes: tuple[str, ...] = SCOPES,
             **storage: Any) -> AgentConfig:
    return AgentConfig.model_validate({"device_id": device, "data_dir": data_dir,
                                       "scopes": list(scopes), "storage": storage})


def rec(k: str, q: int, f: dict[str, Any] | None = None, *, c: str = "tasks",
        s: str = "route-42", part: bool = False, h: dict[str, str] | None = None,
        **extra: Any) -> wire.Rec:
    """A record state; lww/manual fields get a stamp from van-7 unless `h` is given."""
    fields = dict(f or {})
    if h is None:
        h = {name: f"{0x0190_0000_0000 + q:012x}0000:van-7" for name in fields
             if name in ("route", "status", "customer", "notes", "address", "eta", "proof",
                         "depot", "sku", "name", "bin", "price")}
    return wire.Rec.model_validate({"c": c, "k": k, "s": s, "q": q, "part": part, "f": fields,
                                    "h": h, **extra})


def outbox_numbers(ag: Agent) -> list[int]:
    return [entry["ch"]["n"] for entry in ag.pending()]


def assert_views_consistent(ag: Agent) -> None:
    """Every stored view equals base + pending recomputed from scratch; status counts
    match the outbox."""
    core = ag._core

    def run(work: Any) -> None:
        records: set[bytes] = set()
        records.update(k for k in work.tx.keys("view"))
        records.update(k for k in work.tx.keys("base"))
        records.update(k[1:-9] for k in work.tx.keys("outbox_idx", b"R"))
        for rk in records:
            c, _, k = rk.decode().partition("\0")
            base = work.load_base(rk, c, k)
            expected = compute_view(base, work.pending_changes(rk), core.spec(c), core.dev,
                                    c=c, k=k)
            stored = work.load_view(rk, c, k)
            assert stored == expected, (c, k, stored, expected)
        assert work.tx.count("outbox") * 2 == work.tx.count("outbox_idx")

    core.read(run)
    assert ag.status().pending == len(ag.pending())


def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        time.sleep(interval)


__all__ = ["SCOPES", "FakeClock", "assert_views_consistent", "make_cfg", "outbox_numbers", "rec",
           "record_key", "wait_until"]


def compact_in_place(data_dir: Path) -> None:
    """Rewrite the agent store under `data_dir` compacted (LMDB's copy): every page of
    the file is then a live page of a tree, so damage anywhere hits data."""
    env_dir = data_dir / ENV_DIRNAME
    tmp = data_dir / "compact"
    tmp.mkdir()
    env = lmdb.open(str(env_dir), max_dbs=32, readonly=True, lock=False)
    try:
        env.copy(str(tmp), compact=True)
    finally:
        env.close()
    os.replace(tmp / "data.mdb", env_dir / "data.mdb")
    tmp.rmdir()
