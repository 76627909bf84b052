"""`waystation schema publish / diff / history / rollback`: the operator's view of the
server-owned schema history (`broker.server.schema_history`, docs/SCHEMA_EVOLUTION.md).

Handlers are `cmd_x(args, env) -> int` like every command (`waystation.cli`); errors
are `WaystationError`s printed as one line with a non-zero exit code.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from typing import Any

from broker.cli.common import now_ms, server_config
from broker.server import schema_history
from broker.server.store import open_store
from schemas.evolution import Difference, diff, migration_to_dict
from waystation.cli.output import table
from waystation.timefmt import iso

EXIT_OK = 0
EXIT_BREAKING = 1
"""`schema diff` exits 1 when a breaking difference is not covered by a migration."""


def _iso(ms: int) -> str:
    return iso(ms)


def _diff_json(d: Difference) -> dict[str, Any]:
    return {"kind": d.kind, "collection": d.collection, "field": d.field,
            "detail": d.detail, "compatible": d.compatible}


def _print_differences(differences: list[Difference]) -> None:
    if not differences:
        print("no differences")
    for d in differences:
        print(d.describe())


def cmd_schema_diff(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """Classify every difference from OLD to NEW; check NEW's migrations against OLD."""
    from schemas.errors import SchemaEvolutionError
    from schemas.evolution import check_step

    old, _ = schema_history.parse_text(schema_history.read_file(str(args.old)), str(args.old))
    new, migrations = schema_history.parse_text(schema_history.read_file(str(args.new)),
                                                str(args.new))
    differences = diff(old, new)
    problem: str | None = None
    try:
        check_step(old, new, migrations)
    except SchemaEvolutionError as exc:
        problem = str(exc)
    if args.json:
        print(json.dumps({"old": old.version, "new": new.version,
                          "differences": [_diff_json(d) for d in differences],
                          "migrations": [migration_to_dict(m) for m in migrations],
                          "publishable": problem is None, "problem": problem}, indent=2))
    else:
        print(f"schema {old.version} ({args.old}) -> {new.version} ({args.new})")
        _print_differences(differences)
        for m in migrations:
            print(f"migration  {json.dumps(migration_to_dict(m))}")
        print(f"publishable: {'yes' if problem is None else 'no: ' + problem}")
    return EXIT_OK if problem is None else EXIT_BREAKING


def cmd_schema_publish(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """Check FILE against the live version and store it as the new live version."""
    text = schema_history.read_file(str(args.file))
    store = open_store(server_config(args, env))
    try:
        done = schema_history.publish(store, text, str(args.file), now_ms())
    finally:
        store.close()
    if args.json:
        print(json.dumps({"version": done.version, "previous": done.previous,
                          "records_rewritten": done.records,
                          "differences": [_diff_json(d) for d in done.differences]},
                         indent=2))
        return EXIT_OK
    if done.previous is None:
        print(f"published schema version {done.version} (the first in the history)")
        # Nothing was checked against what devices run, and an older version is not in
        # the history: devices that state the `schema` capability and run one hold their
        # changes as too old (welcome.sv_min, PROTOCOL.md §11).
        print(f"  the history starts here: devices on a version below {done.version} hold "
              "their changes as too old until they upgrade; if the fleet runs an older "
              "version, that one should have been published first (deploy/README.md, "
              "'Changing the schema')")
    else:
        print(f"published schema version {done.version} after {done.previous}")
        _print_differences(done.differences)
        if done.records:
            print(f"{done.records} stored records rewritten in version {done.version}'s "
                  "names and types")
    print("running servers serve it within a few seconds (no restart); devices that take "
          "versions from the server follow when online")
    return EXIT_OK


def cmd_schema_history(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """List every published version, the live one marked."""
    config = server_config(args, env)
    if config.store.kind == "lmdb" and not (config.data_dir / "store" / "data.mdb").is_file():
        # Nothing published where no store is: say so without creating one (a stray
        # ./waystation-data would take every later command run from here).
        if args.json:
            print(json.dumps({"live": None, "versions": []}, indent=2))
        else:
            print(f"no schema published yet (no server store at {config.data_dir / 'store'}; "
                  "give the server's --config): `waystation schema publish FILE`")
        return EXIT_OK
    store = open_store(config)
    try:
        with store.read() as txn:
            every = schema_history.rows(txn)
            devices = txn.devices()
    finally:
        store.close()
    live = max((r.version for r in every if not r.rolled_back_ms), default=None)
    on: dict[int, int] = {}
    for dev in devices:
        on[dev.sv] = on.get(dev.sv, 0) + 1
    if args.json:
        print(json.dumps({"live": live, "versions": [
            {"version": r.version, "published": r.published_ms, "source": r.source,
             "rolled_back": r.rolled_back_ms, "devices": on.get(r.version, 0)}
            for r in every]}, indent=2))
        return EXIT_OK
    if not every:
        print("no schema published yet: `waystation schema publish FILE`")
        return EXIT_OK
    # Headed, as the other operator tables: bare columns left the reader to guess that
    # the count is of devices last reported on that version.
    table(["VERSION", "PUBLISHED", "DEVICES ON IT", "STATE", "FROM FILE"],
          [[r.version, _iso(r.published_ms), on.get(r.version, 0),
            "rolled back " + _iso(r.rolled_back_ms) if r.rolled_back_ms
            else "LIVE" if r.version == live else "-", r.source] for r in every])
    return EXIT_OK


def cmd_schema_rollback(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """Roll the live version back to the previous one."""
    store = open_store(server_config(args, env))
    try:
        was, now = schema_history.rollback(store, now_ms())
    finally:
        store.close()
    if getattr(args, "json", False):
        print(json.dumps({"rolled_back": was, "live": now}))
        return EXIT_OK
    print(f"rolled back schema version {was}; version {now} is live again: running servers "
          "serve it within a few seconds, and devices that took version "
          f"{was} from the server go back to {now}")
    return EXIT_OK


__all__ = ["cmd_schema_diff", "cmd_schema_history", "cmd_schema_publish",
           "cmd_schema_rollback"]
