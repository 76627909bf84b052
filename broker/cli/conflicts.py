"""Conflicts: `waystation server conflicts` lists them, `server resolve` settles one."""

from __future__ import annotations

import argparse
from collections.abc import Mapping

from broker.cli.common import live_schema, now_ms, open_existing_store, server_config
from broker.errors import InvalidArgument
from broker.server.operations import resolve_conflict
from waystation.cli.output import ago, print_json, short, table
from waystation.hlc import SERVER_NODE, Clock


def cmd_server_conflicts(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`waystation server conflicts [--all]`: open conflicts (or the whole log)."""
    show_all = bool(getattr(args, "all", False))
    limit = getattr(args, "limit", None)
    limit = 1000 if limit is None else int(limit)
    if limit < 1:
        raise InvalidArgument("--limit must be at least 1")
    store = open_existing_store(server_config(args, env))
    try:
        with store.read() as txn:
            rows = txn.conflicts(open_only=not show_all, limit=limit)
    finally:
        store.close()
    if args.json:
        print_json([r.to_json() for r in rows])
        return 0
    if not rows:
        print("no open conflicts" if not show_all else "the conflict log is empty")
        return 0
    now = now_ms()
    out = []
    for r in rows:
        winner = r.entry.get("winner") or {}
        loser = r.entry.get("loser") or {}
        out.append([r.id, "open" if r.open else "closed", f"{r.c}/{r.k}", r.s, r.field,
                      r.entry.get("kind", ""),
                      f"{short(winner.get('v'))} by {winner.get('by', '?')}" if winner else "-",
                      f"{short(loser.get('v'))} by {loser.get('by', '?')}",
                      ago(r.created_ms, now)])
    table(["ID", "STATE", "RECORD", "SCOPE", "FIELD", "KIND", "KEPT", "CONCURRENT", "AGE"],
           out)
    if not show_all:
        print("\nsettle one with `waystation server resolve ID VALUE`")
    return 0


def cmd_server_resolve(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`waystation server resolve CONFLICT_ID VALUE`: write VALUE and close the conflict."""
    try:
        cid = int(str(args.conflict_id))
    except ValueError:
        raise InvalidArgument(f"{args.conflict_id!r} is not a conflict id (a number, see "
                              "`waystation server conflicts`)") from None
    config = server_config(args, env)
    store = open_existing_store(config)
    try:
        catalog = live_schema(config, store).catalog
        now = now_ms()
        res = resolve_conflict(store, catalog, Clock(SERVER_NODE, now_ms), cid, args.value, now)
    finally:
        store.close()
    if getattr(args, "json", False):
        print_json({"conflict": res.conflict_id, "record": f"{res.c}/{res.k}", "scope": res.s,
                     "field": res.field, "value": res.value, "q": res.q,
                     "closed": list(res.closed)})
        return 0
    print(f"resolved conflict {res.conflict_id}: {res.c}/{res.k} {res.field} = "
          f"{short(res.value, 80)} (scope {res.s}, version {res.q}); closed "
          f"{len(res.closed)} conflict(s). The running server sends it to the online devices "
          "of the scope; the others get it when they catch up.")
    return 0


__all__ = ["cmd_server_conflicts", "cmd_server_resolve"]
