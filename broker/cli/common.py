"""What the server-side operator commands share: the clock and the server's config."""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping

from broker.errors import StoreError
from broker.server.schema_push import LiveSchema
from broker.server.store import open_store
from broker.server.store.base import Store
from schemas.collection import Catalog, load_catalog
from waystation.config import ServerConfig, load_config

DEFAULT_DEAD_LETTER_LIMIT = 50


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def server_config(args: argparse.Namespace, env: Mapping[str, str]) -> ServerConfig:
    """The server config of a command: its `--config` file plus the environment."""
    return load_config(ServerConfig, getattr(args, "config", None), env)


def open_existing_store(config: ServerConfig) -> Store:
    """The server's store, for an operator command about what is in it: refused (exit
    3) when the LMDB store does not exist. Why: opening it would create an empty one, so
    a command run without the server's `--config`, or in another directory than the
    server's, made a stray ./waystation-data and reported an empty fleet ("no devices
    registered", "NO MERGE SERVER IS RUNNING") instead of the mistake. `server run`,
    `device add` and the `schema` commands still make a new fleet's store."""
    store_dir = config.data_dir / "store"
    if config.store.kind == "lmdb" and not (store_dir / "data.mdb").is_file():
        raise StoreError(
            f"no server store at {store_dir}: give the config the server runs with "
            "(`--config /etc/waystation/server.toml`), or run this in the directory "
            "`waystation server run` runs in (a new fleet's store is made by `waystation "
            "server run` or `waystation device add`)")
    return open_store(config)


def server_catalog(config: ServerConfig) -> Catalog:
    """The collection schema the server's config names."""
    return load_catalog(config.schema_path())


def live_schema(config: ServerConfig, store: Store) -> LiveSchema:
    """The schema a running server with this config and store runs: the newest live
    version `waystation schema publish` stored, unless the config's file is newer than
    the whole history (`LiveSchema`). Commands that read or merge records use it, not
    the file alone: after a publish the file still names the older version until the
    operator copies the new one over it, and the records are already in the new one."""
    live = LiveSchema(server_catalog(config))
    with store.read() as txn:
        live.refresh(txn)
    return live


__all__ = ["DEFAULT_DEAD_LETTER_LIMIT", "live_schema", "now_ms", "open_existing_store",
           "server_catalog", "server_config"]
