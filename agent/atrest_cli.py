"""Handlers of `waystation agent encrypt | decrypt | rekey` (`agent.atrest`)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

import orjson

from agent import atrest
from agent.keyring import KeyEncryptionKey
from agent.opening import key_file_path
from waystation.config import AgentConfig, expand_path, load_config
from waystation.errors import ConfigError


def _current_key(args: argparse.Namespace, cfg: AgentConfig,
                 env: Mapping[str, str]) -> KeyEncryptionKey:
    """The key the store is (to be) encrypted with: --key-file, else the config's."""
    given = getattr(args, "key_file", None)
    path = (expand_path(given, env, key="--key-file") if given is not None
            else key_file_path(cfg, env))
    if path is None:
        raise ConfigError(
            "no encryption key: pass --key-file PATH or set storage.encryption_key_file in "
            "the agent's config (32 random bytes: head -c 32 /dev/urandom > PATH)")
    return KeyEncryptionKey.from_file(
        path, "--key-file" if given is not None else "storage.encryption_key_file")


def _show(args: argparse.Namespace, outcome: atrest.Outcome) -> int:
    if getattr(args, "json", False):
        print(orjson.dumps(outcome.to_dict(), option=orjson.OPT_INDENT_2).decode())
    else:
        print(outcome.message)
    return 0


def cmd_encrypt(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`agent encrypt [--key-file PATH]`: encrypt the store in place (or finish it)."""
    cfg = load_config(AgentConfig, getattr(args, "config", None), env)
    kek = _current_key(args, cfg, env)
    return _show(args, atrest.encrypt(Path(cfg.data_dir), kek,
                                      max_map_size_mb=cfg.storage.max_map_size_mb,
                                      batch=args.batch))


def cmd_decrypt(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`agent decrypt [--key-file PATH]`: store the values in plain text again."""
    cfg = load_config(AgentConfig, getattr(args, "config", None), env)
    kek = _current_key(args, cfg, env)
    return _show(args, atrest.decrypt(Path(cfg.data_dir), kek,
                                      max_map_size_mb=cfg.storage.max_map_size_mb,
                                      batch=args.batch))


def cmd_rekey(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`agent rekey --new-key-file PATH [--key-file PATH]`: re-wrap the data key."""
    cfg = load_config(AgentConfig, getattr(args, "config", None), env)
    old = _current_key(args, cfg, env)
    new = KeyEncryptionKey.from_file(
        expand_path(args.new_key_file, env, key="--new-key-file"), "--new-key-file")
    return _show(args, atrest.rekey(Path(cfg.data_dir), old, new,
                                    max_map_size_mb=cfg.storage.max_map_size_mb))


__all__ = ["cmd_decrypt", "cmd_encrypt", "cmd_rekey"]
