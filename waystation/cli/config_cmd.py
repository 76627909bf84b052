"""`waystation config show PART`: the effective configuration of a part."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping

from waystation.cli.exitcodes import EXIT_OK


def cmd_config_show(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`waystation config show PART [--config F]`: the effective config as TOML."""
    from waystation.config import MODELS, dump_toml, env_overrides, load_config

    model = MODELS[args.part]
    config = load_config(model, args.config, env)
    overrides = env_overrides(model, env)
    header = [f"effective {args.part} config from "
              + (str(args.config) if args.config is not None else "built-in defaults")]
    header += [f"{var} sets {key}" for var, key in overrides.items()]
    header.append("secrets are masked")
    sys.stdout.write(dump_toml(config, mask_secrets=True, header="\n".join(header)))
    return EXIT_OK


__all__ = ["cmd_config_show"]
