"""`waystation server encrypt | decrypt | rekey`: encryption at rest of the LMDB store
(`broker.server.store.lmdb_atrest`), with the server stopped."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

from agent.keyring import KeyEncryptionKey
from broker.cli.common import server_config
from broker.errors import InvalidArgument
from broker.server.store import lmdb_atrest
from broker.server.store.lmdb_keys import load_kek
from waystation.atrest.outcome import Outcome
from waystation.cli.output import print_json
from waystation.config import ServerConfig, expand_path


def _lmdb_only(config: ServerConfig, command: str) -> None:
    if config.store.kind != "lmdb":
        raise InvalidArgument(
            f"`server {command}` works on the LMDB store; this server uses PostgreSQL: "
            "encrypt the database's volume instead (see deploy/README.md, \"Encryption "
            "at rest\")")


def _current_key(args: argparse.Namespace, config: ServerConfig,
                 env: Mapping[str, str]) -> KeyEncryptionKey:
    """--key-file, else store.encryption_key_file."""
    if args.key_file is not None:
        return load_kek(expand_path(args.key_file, env, key="--key-file"), "--key-file")
    if config.store.encryption_key_file is None:
        raise InvalidArgument(
            "no encryption key: pass --key-file PATH or set store.encryption_key_file in "
            "the server's config (32 random bytes: head -c 32 /dev/urandom > PATH)")
    return load_kek(expand_path(config.store.encryption_key_file, env,
                                key="store.encryption_key_file"))


def _show(args: argparse.Namespace, outcome: Outcome) -> int:
    if args.json:
        print_json(outcome.to_dict())
    else:
        print(outcome.message)
    return 0


def cmd_server_encrypt(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    config = server_config(args, env)
    _lmdb_only(config, "encrypt")
    kek = _current_key(args, config, env)
    return _show(args, lmdb_atrest.encrypt(Path(config.data_dir), kek, batch=args.batch,
                                           max_map_size_mb=config.store.max_map_size_mb))


def cmd_server_decrypt(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    config = server_config(args, env)
    _lmdb_only(config, "decrypt")
    kek = _current_key(args, config, env)
    return _show(args, lmdb_atrest.decrypt(Path(config.data_dir), kek, batch=args.batch,
                                           max_map_size_mb=config.store.max_map_size_mb))


def cmd_server_rekey(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    config = server_config(args, env)
    _lmdb_only(config, "rekey")
    old = _current_key(args, config, env)
    new = load_kek(expand_path(args.new_key_file, env, key="--new-key-file"),
                   "--new-key-file")
    return _show(args, lmdb_atrest.rekey(Path(config.data_dir), old, new,
                                         max_map_size_mb=config.store.max_map_size_mb))


__all__ = ["cmd_server_decrypt", "cmd_server_encrypt", "cmd_server_rekey"]
