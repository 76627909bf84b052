"""What the server-side operator commands share: the clock and the server's config."""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping

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


__all__ = ["DEFAULT_DEAD_LETTER_LIMIT", "now_ms", "server_catalog", "server_config"]
