"""Does a device's view equal the server's? (Guarantee 2 of the design.)

Once the fleet is online and quiet, every device's view of each record in its scopes
must equal the server's. `compare` checks exactly that, record by record, for one
device: the server side is read from its store, the device side through the agent's
API. The demo ends with it and the end-to-end tests assert on it.

A record the server holds as deleted equals a device record that is deleted or absent
(a device that never saw the record has nothing to delete). A record the device evicted
by retention (`agent.evict`) is not held on purpose: it is left out of the comparison.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from waystation import merge


class _Records(Protocol):
    """What `compare` needs of an open agent (agent.api.Agent)."""

    def list(self, collection: str, prefix: str | None = None, limit: int | None = None, *,
             include_deleted: bool = False) -> Any: ...

    def evicted_keys(self, collection: str) -> Iterable[str]: ...


@dataclass(frozen=True)
class RecordView:
    deleted: bool
    fields: dict[str, Any]
    conflicts: frozenset[str] = frozenset()
    """Manual fields with an open conflict."""


@dataclass(frozen=True)
class Mismatch:
    collection: str
    key: str
    server: RecordView | None
    device: RecordView | None

    def describe(self) -> str:
        return (f"{self.collection}/{self.key}: server {_show(self.server)} "
                f"!= device {_show(self.device)}")


def server_records(store: Any, scopes: Iterable[str]) -> dict[tuple[str, str], RecordView]:
    """Every record of `scopes` as the server holds it (store: broker.server.store.base.Store)."""
    out: dict[tuple[str, str], RecordView] = {}
    with store.read() as txn:
        for scope in scopes:
            after = 0
            while True:
                rows = txn.index_range(scope, after, 5000)
                if not rows:
                    break
                for q, c, k in rows:
                    after = q
                    raw = txn.get_record(c, k)
                    if raw is None:
                        continue
                    rec = merge.to_rec(merge.from_json(raw))
                    out[(c, k)] = RecordView(bool(rec.get("x")), dict(rec.get("f", {})),
                                             frozenset(rec.get("cf", {})))
    return out


def device_records(agent: _Records, collections: Iterable[str]
                   ) -> dict[tuple[str, str], RecordView]:
    out: dict[tuple[str, str], RecordView] = {}
    for c in collections:
        for rec in agent.list(c, include_deleted=True):
            out[(c, rec.key)] = RecordView(bool(rec.deleted), dict(rec.fields),
                                           frozenset(rec.conflicts))
    return out


def compare(store: Any, agent: _Records, scopes: Iterable[str],
            collections: Iterable[str]) -> list[Mismatch]:
    """Records of `scopes` on which the device's view differs from the server's."""
    scopes = list(scopes)
    collections = list(collections)
    server = server_records(store, scopes)
    device = {key: view for key, view in device_records(agent, collections).items()}
    for c in collections:
        for k in agent.evicted_keys(c):
            if (c, k) not in device:
                server.pop((c, k), None)
    mismatches: list[Mismatch] = []
    for key in sorted(set(server) | set(device)):
        s, d = server.get(key), device.get(key)
        if _same(s, d):
            continue
        mismatches.append(Mismatch(key[0], key[1], s, d))
    return mismatches


def _same(s: RecordView | None, d: RecordView | None) -> bool:
    s_gone = s is None or s.deleted
    d_gone = d is None or d.deleted
    if s_gone or d_gone:
        return s_gone and d_gone
    assert s is not None and d is not None
    return s.fields == d.fields and s.conflicts == d.conflicts


def _show(view: RecordView | None) -> str:
    if view is None:
        return "absent"
    if view.deleted:
        return "deleted"
    if view.conflicts:
        return f"{view.fields!r} (open conflicts: {', '.join(sorted(view.conflicts))})"
    return repr(view.fields)
