"""Parser groups of the built-in tools: `demo`, `schema`, `config`."""

from __future__ import annotations

from pathlib import Path

from waystation.cli.builder import Builder, json_flag


def add_demo(b: Builder) -> None:
    p = b.leaf("demo", "run a small fleet on this machine and watch it sync",
               "Start an embedded broker, a server and three device agents in this process, "
               "make them write while offline and online, and narrate how every change "
               "reaches every device, how counters add up and how a conflict is kept for a "
               "person. Everything lives in a temporary data directory that is removed "
               "afterwards unless --keep is given.")
    p.add_argument("--data-dir", metavar="DIR", type=Path, default=None,
                   help="where the demo keeps its data (default: a new temporary directory)")
    p.add_argument("--keep", action="store_true",
                   help="keep the data directory afterwards, to inspect it")


def add_schema(b: Builder) -> None:
    b.group("schema", "check collection schemas, export wire JSON Schemas",
            "Work with schemas: check an operator's collection schema file, or export "
            "the JSON Schema of every wire message.")
    p = b.leaf("schema check", "validate a collection schema file and summarise it",
               "Load a collection schema file (TOML) and validate it: every error names "
               "the file, collection and field. When valid, print its version and each "
               "collection's scope rule and fields with their type and merge strategy.")
    p.add_argument("file", metavar="FILE", type=Path, help="the collection schema (TOML)")
    json_flag(p)
    p = b.leaf("schema export", "write the wire messages' JSON Schema files",
               "Write the JSON Schema of every wire message (generated from the pydantic "
               "models) into schemas/json/, or with --check verify that the files there "
               "are up to date.")
    p.add_argument("--check", action="store_true",
                   help="do not write; exit non-zero when the files are out of date")
    p.add_argument("--dir", metavar="DIR", type=Path, default=None,
                   help="the directory of the JSON Schema files (default: schemas/json/ "
                        "of the installed package)")


def add_config(b: Builder) -> None:
    b.group("config", "show effective configuration",
            "Inspect configuration as a part will see it: the config file, then "
            "WAYSTATION_<PART>__* environment overrides, then the built-in defaults.")
    p = b.leaf("config show", "print the effective config of a part as TOML",
               "Load the config of PART (agent, server or broker) exactly as its commands "
               "do, file plus environment overrides, and print the effective settings as "
               "TOML with secrets masked; optional settings that are unset (metrics_port, "
               "encryption_key_file, TLS files, ...) appear as comments with their "
               "defaults. Also a quick way to validate a config file.")
    p.add_argument("part", metavar="PART", choices=("agent", "server", "broker"),
                   help="agent, server or broker")
    p.add_argument("--config", "-c", metavar="FILE", type=Path, default=None,
                   help="the config file (TOML); without it the built-in defaults apply")
    json_flag(p)
