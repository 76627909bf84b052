"""`waystation config show PART`: the effective configuration of a part."""

from __future__ import annotations

import argparse
import sys
import tomllib
from collections.abc import Mapping
from typing import Any

from waystation.cli.config_text import annotate, unset_comments
from waystation.cli.exitcodes import EXIT_OK
from waystation.cli.output import print_json


def cmd_config_show(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`waystation config show PART [--config F] [--json]`: the effective config as TOML
    (unset optional keys as comments), or as one JSON document."""
    from waystation.config import MODELS, dump_toml, env_overrides, load_config

    model = MODELS[args.part]
    config = load_config(model, args.config, env)
    overrides = env_overrides(model, env)
    masked = dump_toml(config, mask_secrets=True)
    if getattr(args, "json", False):
        # Every key, unset ones as null; secrets masked exactly as in the TOML form.
        doc = _overlay(config.model_dump(mode="json"), tomllib.loads(masked))
        print_json({"part": args.part,
                    "file": str(args.config) if args.config is not None else None,
                    "env_overrides": dict(overrides), "config": doc})
        return EXIT_OK
    header = [f"effective {args.part} config from "
              + (str(args.config) if args.config is not None else "built-in defaults")]
    header += [f"{var} sets {key}" for var, key in overrides.items()]
    header.append("secrets are masked; optional settings that are unset are shown as comments")
    text = dump_toml(config, mask_secrets=True, header="\n".join(header))
    sys.stdout.write(annotate(text, unset_comments(config)))
    return EXIT_OK


def _overlay(full: dict[str, Any], masked: dict[str, Any]) -> dict[str, Any]:
    for key, value in masked.items():
        if isinstance(value, dict) and isinstance(full.get(key), dict):
            _overlay(full[key], value)
        else:
            full[key] = value
    return full


__all__ = ["cmd_config_show"]
