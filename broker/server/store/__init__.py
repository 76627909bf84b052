"""Server stores: the interface (`base`) and its backends (`lmdb_store`, `postgres_store`).

`open_store(config)` opens the backend a `ServerConfig` names.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from broker.errors import StoreError
from broker.server.store.base import DeadLetterLimits, Store
from waystation.config import ServerConfig


def dead_letter_limits(config: ServerConfig) -> DeadLetterLimits:
    """The store bounds of `config.dead_letters`."""
    dl = config.dead_letters
    return DeadLetterLimits(max_count=dl.max_count, max_bytes=dl.max_bytes,
                            max_age_ms=dl.max_age_s * 1000)


def open_store(config: ServerConfig, env: Mapping[str, str] | None = None) -> Store:
    """Open the store configured in `config.store`: LMDB under `config.data_dir` (its
    values encrypted with store.encryption_key_file when set; `env` expands
    ${CREDENTIALS_DIRECTORY} in it, default os.environ), or the PostgreSQL database at
    `config.store.url` (its schema is created or migrated)."""
    if config.store.kind == "lmdb":
        from broker.server.store.lmdb_keys import configured_kek
        from broker.server.store.lmdb_store import LmdbStore

        return LmdbStore(config.data_dir, map_size_mb=config.store.map_size_mb,
                         max_map_size_mb=config.store.max_map_size_mb,
                         dead_letters=dead_letter_limits(config),
                         kek=configured_kek(config, os.environ if env is None else env))
    if config.store.kind == "postgres":
        from broker.server.store.postgres import PostgresStore

        if not config.store.url:  # pragma: no cover - StoreConfig requires it
            raise StoreError("store.kind = \"postgres\" needs store.url")
        return PostgresStore(config.store.url, reconnect_s=config.store.reconnect_s,
                             dead_letters=dead_letter_limits(config))
    raise StoreError(f"store.kind = {config.store.kind!r} is not available in this version; "
                     "use kind = \"lmdb\" or \"postgres\"")


__all__ = ["dead_letter_limits", "open_store"]
