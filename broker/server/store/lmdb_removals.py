"""The LMDB table of login removals (`base.LoginRemoval`), and the format 1 -> 2
migration that moved them out of the commands table.

    login_removals  dev -> JSON LoginRemoval

Format 1 kept a removal as a command row of the removed device's id, ``cmd`` =
``"remove_login"``, its failure in ``args`` (``failed_ms``, ``error``, ``hint``), and
had to keep it from ever being sent to a device; `migrate_1_to_2` moves those rows
here, in the transaction that opens the store (all or nothing).
"""

from __future__ import annotations

from typing import Any

import lmdb
import orjson

from broker.server.store.rows import CommandRow, LoginRemoval

_DB = "login_removals"
LEGACY_CMD = "remove_login"
"""The command name format 1 used for a pending login removal."""


def _key(dev: str) -> bytes:
    return dev.encode("utf-8")


def all_rows(txn: lmdb.Transaction[bytes], dbs: dict[str, Any]) -> list[LoginRemoval]:
    with txn.cursor(db=dbs[_DB]) as cur:
        rows = [LoginRemoval.from_json(orjson.loads(v)) for _, v in cur]
    return sorted(rows, key=lambda r: (r.queued_ms, r.device))


def get(txn: lmdb.Transaction[bytes], dbs: dict[str, Any], dev: str) -> LoginRemoval | None:
    raw = txn.get(_key(dev), db=dbs[_DB])
    return None if raw is None else LoginRemoval.from_json(orjson.loads(raw))


def put(txn: lmdb.Transaction[bytes], dbs: dict[str, Any], row: LoginRemoval) -> None:
    txn.put(_key(row.device), orjson.dumps(row.to_json()), db=dbs[_DB])


def delete(txn: lmdb.Transaction[bytes], dbs: dict[str, Any], dev: str) -> bool:
    return bool(txn.delete(_key(dev), db=dbs[_DB]))


def from_command(row: CommandRow) -> LoginRemoval:
    """A format 1 `remove_login` command row as a removal."""
    failed = row.args.get("failed_ms")
    return LoginRemoval(row.device, row.id, row.created_ms,
                        failed_ms=failed if isinstance(failed, int) else 0,
                        error=str(row.args.get("error", "")), hint=str(row.args.get("hint", "")))


def migrate_1_to_2(txn: lmdb.Transaction[bytes], dbs: dict[str, Any]) -> int:
    """Move the `remove_login` command rows into the removals table (the newest of a
    device's, should there be several); returns how many rows moved."""
    legacy: list[tuple[bytes, CommandRow]] = []
    with txn.cursor(db=dbs["commands"]) as cur:
        for key, value in cur:
            cmd = CommandRow.from_json(orjson.loads(value))
            if cmd.cmd == LEGACY_CMD:
                legacy.append((bytes(key), cmd))
    for key, cmd in sorted(legacy, key=lambda kc: kc[1].created_ms):
        txn.delete(key, db=dbs["commands"])
        if not cmd.done_ms:
            put(txn, dbs, from_command(cmd))
    return len(legacy)


__all__ = ["LEGACY_CMD", "all_rows", "delete", "from_command", "get", "migrate_1_to_2", "put"]
