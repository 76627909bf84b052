"""Backups of the LMDB store: `waystation server backup` and `server restore`."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

from broker.cli.common import server_config
from broker.errors import InvalidArgument, StoreError
from broker.server.operations import after_restore
from broker.server.store import open_store
from broker.server.store.base import Store
from waystation.cli.output import print_json


def cmd_server_backup(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`waystation server backup DEST`: a consistent copy of the LMDB store."""
    config = server_config(args, env)
    if config.store.kind != "lmdb":
        raise InvalidArgument(
            "`server backup` copies the LMDB store; this server uses PostgreSQL, which is "
            "backed up with PostgreSQL's own tools (pg_dump): see deploy/README.md, "
            "\"Backups\"")
    from broker.server.store.lmdb_store import LmdbStore

    store_dir = config.data_dir / "store"
    if not (store_dir / "data.mdb").is_file():
        # Opening it would create an empty store and "back up" that: a backup with
        # nothing in it, reported as done, e.g. when the command runs without the
        # server's --config from another directory than the server's.
        raise StoreError(
            f"no server store at {store_dir}: nothing backed up. Give the config the "
            "server runs with (`--config /etc/waystation/server.toml`), or run this in "
            "the directory `waystation server run` runs in")
    store = open_store(config)
    try:
        assert isinstance(store, LmdbStore)
        with store.read() as txn:
            seqs = txn.scope_seqs()
        data = store.backup(Path(args.dest))
    finally:
        store.close()
    size = data.stat().st_size
    if args.json:
        print_json({"backup": str(Path(args.dest)), "bytes": size,
                     "scopes": dict(sorted(seqs.items()))})
        return 0
    print(f"backed up the store to {args.dest} ({size / 1048576:.1f} MiB, "
          f"{len(seqs)} scopes)")
    print(f"restore: stop the server, move {config.data_dir / 'store'} aside, run "
          f"`waystation server restore {args.dest}`, start the server")
    return 0


def cmd_server_restore(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`waystation server restore SRC | --in-place`: a restored store made safe to serve."""
    config = server_config(args, env)
    if (args.src is None) == (not args.in_place):
        raise InvalidArgument("name a backup directory (SRC), or say --in-place for a store "
                              "already restored by other means (e.g. pg_restore)")
    if args.src is not None:
        if config.store.kind != "lmdb":
            raise InvalidArgument(
                "SRC is an LMDB store backup; this server uses PostgreSQL: restore the "
                "database with pg_restore, then run `waystation server restore --in-place` "
                "(see deploy/README.md, \"Backups\")")
        from broker.server.store.lmdb_keys import configured_kek
        from broker.server.store.lmdb_store import restore_backup

        store: Store = restore_backup(Path(args.src), config.data_dir,
                               map_size_mb=config.store.map_size_mb,
                               max_map_size_mb=config.store.max_map_size_mb,
                               kek=configured_kek(config, env))
    else:
        store = open_store(config)
    try:
        seqs = after_restore(store)
    finally:
        store.close()
    if args.json:
        print_json({"restored": str(args.src) if args.src else "in place",
                     "scopes": dict(sorted(seqs.items())), "devices_resend": True})
        return 0
    print(f"restored {'the store in place' if args.src is None else args.src} "
          f"({len(seqs)} scopes): every device is ordered to resync (sent as soon as the "
          "server runs and the device is online); it gets a snapshot of the restored "
          "state and keeps its pending writes")
    print(RESEND_NOTE)
    return 0


RESEND_NOTE = (
    "devices re-send what they hold of the changes this server acked after the backup "
    "(their journal of acked changes, sync.acked_journal_days, default 7 days): those "
    "come back as devices come online. Changes acked longer ago than a device's journal "
    "window, or by a device that was wiped, re-imaged or runs an agent without the "
    "journal, cannot come back (deploy/README.md, \"Backups\")")


__all__ = ["cmd_server_backup", "cmd_server_restore"]
