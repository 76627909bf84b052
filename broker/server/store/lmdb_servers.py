"""The LMDB table of merge-server liveness (`base.ServerRow`).

    servers  server id -> JSON ServerRow

Added without a store format bump: `LmdbStore` opens (and so creates) every table of
`lmdb_txn.DBS` when it opens the store, so a format 2 store written before this table
existed gets it, empty, and an earlier format 2 release never opens it. Never sealed
(`lmdb_sealed`): it holds no device data, and the operator's status must read it.
"""

from __future__ import annotations

from typing import Any

import lmdb
import orjson

from broker.server.store.rows import ServerRow

_DB = "servers"


def all_rows(txn: lmdb.Transaction[bytes], dbs: dict[str, Any]) -> list[ServerRow]:
    with txn.cursor(db=dbs[_DB]) as cur:
        return [ServerRow.from_json(orjson.loads(v)) for _, v in cur]


def put(txn: lmdb.Transaction[bytes], dbs: dict[str, Any], row: ServerRow) -> None:
    txn.put(row.id.encode("utf-8"), orjson.dumps(row.to_json()), db=dbs[_DB])


def delete(txn: lmdb.Transaction[bytes], dbs: dict[str, Any], server_id: str) -> bool:
    return bool(txn.delete(server_id.encode("utf-8"), db=dbs[_DB]))


__all__ = ["all_rows", "delete", "put"]
