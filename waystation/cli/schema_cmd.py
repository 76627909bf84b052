"""`waystation schema check|export`: validate a collection schema, export wire schemas."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import TYPE_CHECKING

from waystation.cli.commands import load_callable, not_available
from waystation.cli.exitcodes import EXIT_OK
from waystation.cli.output import table

if TYPE_CHECKING:
    from schemas.collection import FieldSpec


def cmd_schema_check(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`waystation schema check FILE`: validate and summarise a collection schema."""
    from schemas.collection import load_catalog

    catalog = load_catalog(args.file)
    if args.json:
        import json

        doc = catalog.model_dump(mode="json", exclude={"source"})
        for coll in doc["collections"].values():
            for name, fspec in coll["fields"].items():
                fspec["merge"] = catalog.collections[coll["name"]].fields[name].strategy
        print(json.dumps({"file": str(args.file), **doc}, indent=2))
        return EXIT_OK
    nfields = sum(len(c.fields) for c in catalog.collections.values())
    print(f"{args.file}: valid collection schema, version {catalog.version}, "
          f"{len(catalog.collections)} collections, {nfields} fields")
    for name, coll in catalog.collections.items():
        scope = (f"scope from field {coll.scope_field!r}" if coll.scope_field is not None
                 else f"fixed scope {coll.scope!r}")
        print()
        print(f"{name}  ({scope})" + (f"  {coll.description}" if coll.description else ""))
        table(["FIELD", "TYPE", "MERGE", "LIMITS"],
              [[fname, spec.type, spec.strategy, ", ".join(_limits(spec)) or "-"]
               for fname, spec in coll.fields.items()], indent="  ")
    return EXIT_OK


def _limits(spec: FieldSpec) -> list[str]:
    limits = []
    if spec.min is not None:
        limits.append(f"min {_num(spec.min)}")
    if spec.max is not None:
        limits.append(f"max {_num(spec.max)}")
    if spec.max_length is not None:
        limits.append(f"max_length {spec.max_length}")
    return limits


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def cmd_schema_export(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`waystation schema export [--check]`: delegates to `schemas.export.main(argv)`."""
    export_main = load_callable("schemas.export:main")
    if export_main is None:
        return not_available("schema export")(args, env)
    argv = ["--check"] if args.check else []
    if args.dir is not None:
        argv += ["--dir", str(args.dir)]
    return int(export_main(argv) or 0)


__all__ = ["cmd_schema_check", "cmd_schema_export"]
