"""Builders for the server tests: an engine on a real store, wire messages, decoding."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import orjson

from broker.server.engine import Engine
from broker.server.registry import add_device
from broker.server.store.base import Store
from broker.server.store.lmdb_store import LmdbStore
from schemas import zdict
from schemas.collection import Catalog, example_catalog_path, load_catalog
from waystation.config import ServerConfig
from waystation.rules import Rule

T0 = 1_760_000_000_000
CATALOG: Catalog = load_catalog(example_catalog_path())


class FakeTime:
    """A wall clock the test moves by hand."""

    def __init__(self, start: int = T0) -> None:
        self.now = start

    def __call__(self) -> int:
        return self.now


def hp(wall: int, counter: int = 0) -> str:
    """A change's stamp time part."""
    return f"{wall:012x}{counter:04x}"


def config(tmp: Path, **merge: Any) -> ServerConfig:
    return ServerConfig.model_validate({"data_dir": str(tmp), "merge": merge})


def make_engine(tmp: Path, devices: dict[str, Sequence[str]] | None = None, *,
                time: FakeTime | None = None, rules: Sequence[Rule] = (),
                catalog: Catalog = CATALOG, store: Store | None = None,
                **merge: Any) -> tuple[Engine, Store, FakeTime]:
    """An engine over `store` (default: a fresh LMDB store under `tmp`) with `devices`
    registered (dev -> scopes)."""
    time = time or FakeTime()
    if store is None:
        store = LmdbStore(tmp)
    for dev, scopes in (devices or {}).items():
        add_device(store, dev, scopes, time())
    engine = Engine(store, catalog, config(tmp, **merge), time, rules=rules)
    return engine, store, time


def task(n: int, key: str, scope: str = "r1", *, h: str | None = None, b: int = 0,
         op: str = "put", create: bool = True, **fields: Any) -> dict[str, Any]:
    """A change to a `tasks` record (sets `route` when `create`)."""
    f = dict(fields)
    if create and op == "put":
        f.setdefault("route", scope)
    ch: dict[str, Any] = {"n": n, "h": h or hp(T0 + n), "c": "tasks", "k": key, "s": scope,
                          "b": b, "op": op}
    if f and op == "put":
        ch["f"] = f
    return ch


def changes(dev: str, chs: Iterable[dict[str, Any]], sv: int = 1) -> bytes:
    return orjson.dumps({"type": "changes", "v": 1, "dev": dev, "sv": sv, "ch": list(chs)})


def hello(dev: str, *, z: bool = False, done: Sequence[str] = (), sv: int = 1) -> bytes:
    return orjson.dumps({"type": "hello", "v": 1, "dev": dev, "agent": "test/1", "sv": sv,
                         "z": z, "done": list(done)})


def catchup(dev: str, cp: dict[str, int], req: str = "c1", *, snap: Sequence[str] = (),
            lim: int = 1000) -> bytes:
    return orjson.dumps({"type": "catchup", "v": 1, "dev": dev, "req": req, "cp": cp,
                         "snap": list(snap), "lim": lim})


def status(dev: str, on: bool = True) -> bytes:
    return orjson.dumps({"type": "status", "v": 1, "dev": dev, "on": on})


def decode(payload: bytes) -> dict[str, Any]:
    if payload[:1] == b"\x78":
        payload = zdict.unpack(payload)
    msg: dict[str, Any] = orjson.loads(payload)
    return msg


def by_device(out: Iterable[tuple[str, bytes]]) -> dict[str, list[dict[str, Any]]]:
    """Outgoing messages decoded and grouped per device, in order."""
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for dev, payload in out:
        grouped[dev].append(decode(payload))
    return dict(grouped)


def of_type(msgs: Iterable[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m for m in msgs if m["type"] == kind]


def oks(msgs: Iterable[dict[str, Any]]) -> list[list[Any]]:
    return [ok for m in of_type(msgs, "ack") for ok in m["ok"]]


def rejections(msgs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for m in of_type(msgs, "reject") for r in m["rj"]]


def errors(msgs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m["err"] for m in of_type(msgs, "reject") if m.get("err")]
