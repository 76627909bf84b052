"""What the server-side operator commands share: the clock and the server's config."""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping

from broker.server.schema_push import LiveSchema
from broker.server.store.base import Store
from schemas.collection import Catalog, load_catalog
from waystation.config import ServerConfig, load_config

DEFAULT_DEAD_LETTER_LIMIT = 50


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def server_config(args: argparse.Namespace, env: Mapping[str, str]) -> ServerConfig:
    """The server config of a command: its `--config` file plus the environment."""
    return load_config(ServerConfig, getattr(args, "config", None), env)


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


__all__ = ["DEFAULT_DEAD_LETTER_LIMIT", "live_schema", "now_ms", "server_catalog",
           "server_config"]
