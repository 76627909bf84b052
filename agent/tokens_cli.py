"""Handlers of `waystation agent token add|list|remove` (the local API's app tokens)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

import orjson

from agent.http.auth import AppToken, TokenStore
from agent.validate import collection as known_collection
from schemas.collection import load_catalog
from waystation.cli.output import table
from waystation.config import AgentConfig, load_config


def _print_json(doc: object) -> None:
    print(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())


def _store(args: argparse.Namespace, env: Mapping[str, str]) -> tuple[AgentConfig, TokenStore]:
    cfg = load_config(AgentConfig, getattr(args, "config", None), env)
    return cfg, TokenStore(Path(cfg.data_dir))


def cmd_token_add(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    cfg, tokens = _store(args, env)
    catalog = load_catalog(cfg.schema_path())
    for raw in [*args.read, *args.write]:
        for name in raw.split(","):
            name = name.strip()
            if name and name != "*":
                known_collection(catalog, name)  # unknown_collection, naming it
    token, entry = tokens.add(args.app, args.read, args.write)
    if getattr(args, "json", False):
        _print_json({"token": token, **entry.to_dict()})
        return 0
    print(token)
    read, write = _rights_text(entry)
    print(f"# token {entry.id} for app {entry.app} (read {read}; write {write}); shown once: "
          "keep it now", flush=True)
    return 0


def _rights_text(token: AppToken) -> tuple[str, str]:
    """What the token may read and write, as `AppToken.can_read` decides: writing a
    collection includes reading it, so a write-only grant does not show as "read -"."""
    names = list(dict.fromkeys([*token.read, *token.write]))
    read = "*" if "*" in names else ",".join(names)
    return read or "-", ",".join(token.write) or "-"


def cmd_token_list(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    _, tokens = _store(args, env)
    found = tokens.list()
    if getattr(args, "json", False):
        print(orjson.dumps([t.to_dict() for t in found], option=orjson.OPT_INDENT_2).decode())
        return 0
    if not found:
        print("no API tokens: issue one with `waystation agent token add APP --write ...`")
        return 0
    # Headed like the operator tables; ID is what `token remove` takes (or the APP).
    table(["ID", "APP", "READ", "WRITE"], [[t.id, t.app, *_rights_text(t)] for t in found])
    return 0


def cmd_token_remove(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    _, tokens = _store(args, env)
    gone = tokens.remove(args.ident)
    if getattr(args, "json", False):
        _print_json({"removed": gone, "ident": args.ident})
        return 0
    print(f"removed {gone} token{'s' if gone != 1 else ''}")
    return 0


__all__ = ["cmd_token_add", "cmd_token_list", "cmd_token_remove"]
