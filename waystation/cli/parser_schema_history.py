"""The argument parsers of `waystation schema publish / diff / history / rollback`
(handlers in `broker.cli.schema_history`). Cheap to import: nothing of the parts is loaded."""

from __future__ import annotations

from pathlib import Path

from waystation.cli.builder import Builder

HANDLERS: dict[str, str] = {
    "schema publish": "broker.cli.schema_history:cmd_schema_publish",
    "schema diff": "broker.cli.schema_history:cmd_schema_diff",
    "schema history": "broker.cli.schema_history:cmd_schema_history",
    "schema rollback": "broker.cli.schema_history:cmd_schema_rollback",
}


def add_commands(b: Builder) -> None:
    """Add the leaves to the `schema` group of `b` ."""
    p = b.leaf("schema diff", "classify every difference between two schema files",
               "Compare two collection schema files and print every difference as "
               "compatible (new collection, new optional field, new index, widened type "
               "or bound) or BREAKING (rename, type change, removed field, narrowed "
               "bound), then whether NEW's [[migrations]] cover the breaking ones "
               "(docs/SCHEMA_EVOLUTION.md). Exit code 1 when NEW could not be published "
               "after OLD.")
    p.add_argument("old", metavar="OLD", type=Path, help="the schema devices run now")
    p.add_argument("new", metavar="NEW", type=Path, help="the schema to publish")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p = b.leaf("schema publish", "check a new schema version and store it on the server",
               "Check FILE against the server's live schema version (every breaking "
               "change needs a declared migration, the version must go up) and store it "
               "in the server store as the new live version. Running servers serve it "
               "within seconds, without a restart. The first version published is the "
               "base of the history and is checked against nothing: publish the version "
               "the fleet runs now first.", config="server")
    p.add_argument("file", metavar="FILE", type=Path, help="the collection schema (TOML)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p = b.leaf("schema history", "list the published schema versions",
               "List every schema version published on this server: when, from which "
               "file, how many devices last reported running it, which one is live and "
               "which were rolled back.", config="server")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p = b.leaf("schema rollback", "make the previous schema version live again",
               "Roll the live schema version back to the one before it. Refused when a "
               "device has run the live version and one of its migrations (remove, narrow, "
               "drop_collection) has no inverse: then publish a newer version instead.",
               config="server")
    p.add_argument("--json", action="store_true", help="print one JSON document")


__all__ = ["HANDLERS", "add_commands"]
