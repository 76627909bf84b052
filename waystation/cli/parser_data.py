"""Parser leaves for reading records and handling dead letters:
`waystation server get|list|export`, `server deadletters [list|show|retry|discard]` and
`agent deadletters [list|show|retry|discard]`.

`deadletters` is a group whose subcommand may be left out: the bare
`waystation server deadletters [--json] [--limit N]` (as in earlier versions) is `list`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from waystation.cli.argtypes import positive_int
from waystation.cli.builder import Builder, json_flag, record_args


def add_server_records(b: Builder) -> None:
    p = b.leaf("server get", "show one record as the server holds it",
               "Show one record of the authoritative store with the field names and values "
               "apps read (never the wire abbreviations): its scope, version, when it was "
               "last written, and per field the merge strategy and who wrote the value. A "
               "deleted record not purged yet is shown as DELETED. An unknown collection "
               "or key is an error (exit code 1).", config="server")
    record_args(p)
    json_flag(p)
    p = b.leaf("server list", "list the records of a collection, a page at a time",
               "List records of COLLECTION in key order, at most --limit of them, with "
               "their decoded fields; continue with --after KEY (the JSON form gives "
               "next_after). Deleted records are left out unless --deleted.",
               config="server")
    p.add_argument("collection", metavar="COLLECTION",
                   help="collection name, as in the collection schema")
    p.add_argument("--scope", metavar="S", default=None, help="only records of scope S")
    p.add_argument("--limit", metavar="N", type=positive_int, default=None,
                   help="at most N records (default 100, at most 10000)")
    p.add_argument("--after", metavar="KEY", default=None,
                   help="start after this key (from the previous page)")
    p.add_argument("--deleted", action="store_true",
                   help="include deleted records (not purged yet), marked deleted")
    json_flag(p)
    p = b.leaf("server export", "write records as JSON lines",
               "Write records (every collection, or --collection C) as JSON lines, one "
               "decoded record document per line, in (collection, key) order, to standard "
               "output or to --out FILE (a new file, written whole or not at all). Memory "
               "stays bounded: the store is read a page at a time, so the export is not "
               "one point-in-time snapshot (use `server backup` for that).",
               config="server")
    p.add_argument("--collection", metavar="C", default=None, help="only collection C")
    p.add_argument("--scope", metavar="S", default=None, help="only records of scope S")
    p.add_argument("--deleted", action="store_true",
                   help="include deleted records (not purged yet), marked deleted")
    p.add_argument("--out", metavar="FILE", type=Path, default=None,
                   help="write into FILE (must not exist) instead of standard output")


def _optional_group(b: Builder, name: str, summary: str, description: str,
                    bare: str) -> argparse.ArgumentParser:
    """A group whose subcommand may be omitted: then it runs as command `bare`."""
    outer, _, last = name.rpartition(" ")
    parser = b.groups[outer].add_parser(last, help=summary, description=description)
    parser.set_defaults(command=bare)
    b.groups[name] = parser.add_subparsers(
        dest=f"{name.replace(' ', '_')}_command", metavar="COMMAND", required=False)
    return parser


def _keep_group_options(p: argparse.ArgumentParser) -> None:
    """Options the group takes too (`deadletters --config F list`): a leaf that is not
    given them must not reset them to its defaults (argparse copies every default of a
    subcommand over what the group parsed)."""
    for action in p._actions:
        if action.dest in ("config", "json", "limit"):
            action.default = argparse.SUPPRESS


def add_deadletters(b: Builder, part: str) -> None:
    """`server deadletters ...` (part "server") or `agent deadletters ...` ("agent")."""
    group = f"{part} deadletters"
    if part == "server":
        what = ("messages and changes the server refused (malformed, too large, not "
                "allowed, from the far future, from unknown devices), kept with the raw "
                "payload")
        ident, ident_help = "letter_id", "the dead letter's id (from `list`)"
    else:
        what = ("this device's changes the server refused for good; each was rolled back "
                "locally and is kept here")
        ident, ident_help = "n", "the change number N of the change id DEVICE:N (from `list`)"
    refused = "refused messages" if part == "server" else "refused changes"
    parser = _optional_group(
        b, group, f"list, show, retry or discard {refused}",
        f"Work with the dead letters: {what}. Without a subcommand: list.",
        f"{group} list")
    parser.add_argument("--config", "-c", metavar="FILE", type=Path, default=None,
                        help=f"the {part} config file (TOML)")
    json_flag(parser)
    if part == "server":
        parser.add_argument("--limit", metavar="N", type=positive_int, default=None,
                            help="list at most N dead letters, newest first (default 50)")

    p = b.leaf(f"{group} list", "list them (the default)", f"List the {what}.",
               config=part)
    json_flag(p)
    if part == "server":
        p.add_argument("--limit", metavar="N", type=positive_int, default=None,
                       help="at most N dead letters, newest first (default 50)")
    p = b.leaf(f"{group} show", "show one, with its whole payload",
               "Show one dead letter: when, why, and the whole change or payload.",
               config=part)
    p.add_argument(ident, metavar="ID" if part == "server" else "N", help=ident_help)
    json_flag(p)
    if part == "server":
        retry_text = (
            "Run the dead letter's stored payload through the server's intake checks and "
            "merge again, as if it had just arrived (e.g. after enrolling or enabling the "
            "device, or upgrading the schema). Changes the server already answered keep "
            "that answer (never applied twice). The letter is removed when every change "
            "has its final answer; exit code 1 when it is still refused (it is kept).")
    else:
        retry_text = (
            "Queue the refused change again as a new change (new number and stamp), "
            "after checking it against the current schema and scopes; the dead letter is "
            "removed. Use it once the cause is fixed (schema or rule changed, scope "
            "granted).")
    p = b.leaf(f"{group} retry", "run it again", retry_text, config=part)
    p.add_argument(ident, metavar="ID" if part == "server" else "N", help=ident_help)
    json_flag(p)
    p = b.leaf(f"{group} discard", "drop it for good",
               "Drop a dead letter for good" + (
                   " (or every dead letter of one device with --all-for DEVICE)."
                   if part == "server" else "; the change stays rolled back."),
               config=part)
    if part == "server":
        p.add_argument(ident, metavar="ID", nargs="?", default=None, help=ident_help)
        p.add_argument("--all-for", metavar="DEVICE", default=None,
                       help="discard every dead letter of this device")
    else:
        p.add_argument(ident, metavar="N", help=ident_help)
    json_flag(p)
    for leaf in ("list", "show", "retry", "discard"):
        _keep_group_options(b.groups[group].choices[leaf])


__all__ = ["add_deadletters", "add_server_records"]
