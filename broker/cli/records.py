"""Reading the server's records: `waystation server get`, `server list`, `server export`.

Documents come from `broker.server.record_docs` (decoded field names and values, never
the storage abbreviations); records are paged through the store by
`broker.server.record_reads`, so memory stays bounded however big a collection is.
Deleted records (tombstones not purged yet): `get` shows one marked ``deleted``; `list`
and `export` leave them out unless ``--deleted`` is given, and then mark them.
Unknown collection or key: one line on stderr, exit code 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import orjson

from broker.cli.common import live_schema, open_existing_store, server_config
from broker.errors import InvalidArgument
from broker.server.record_docs import record_doc
from broker.server.record_reads import check_collection, get_record, iter_records, list_page
from waystation.cli.output import print_json, short, table
from waystation.hlc import SERVER_NODE

DEFAULT_LIST_LIMIT = 100
MAX_LIST_LIMIT = 10_000


def cmd_server_get(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`waystation server get COLLECTION KEY [--json]`: one record, decoded."""
    config = server_config(args, env)
    store = open_existing_store(config)
    try:
        catalog = live_schema(config, store).catalog
        record = get_record(store, catalog, args.collection, args.key)
    finally:
        store.close()
    doc = record_doc(record, catalog.collection(record.c), detail=True)
    if args.json:
        print_json(doc)
        return 0
    for line in _record_lines(doc):
        print(line)
    return 0


def _record_lines(doc: dict[str, Any]) -> list[str]:
    head = (f"{doc['collection']}/{doc['key']}  scope {doc['scope']}, version "
            f"{doc['version']}, updated {doc['updated'] or '-'}")
    if doc["deleted"]:
        by = doc.get("deleted_by") or {}
        return [head, f"  DELETED by {by.get('device', '?')} (change {by.get('change', '?')}) "
                      f"at {by.get('time', '?')}"]
    lines = [head]
    info: dict[str, Any] = doc.get("field_info", {})
    width = max((len(name) for name in doc["fields"]), default=0)
    for name, value in sorted(doc["fields"].items()):
        fi = info.get(name, {})
        how = fi.get("merge") or "not in the schema"
        if fi.get("by") == SERVER_NODE:
            # Written by the server itself: an operator's `server resolve`, no change id.
            how += f", set by the server (an operator's resolve) at {fi['time']}"
        elif "by" in fi:
            how += f", by {fi['by']} change {fi['change']} at {fi['time']}"
        lines.append(f"  {name:<{width}}  {orjson.dumps(value).decode()}  [{how}]")
    for name in doc["open_conflicts"]:
        values = [c["value"] for c in info.get(name, {}).get("conflict", [])]
        lines.append(f"  open conflict on {name}: also written {short(values, 80)} (see "
                     "`waystation server conflicts`)")
    return lines


def _limit(value: int | None) -> int:
    limit = DEFAULT_LIST_LIMIT if value is None else int(value)
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise InvalidArgument(f"--limit must be between 1 and {MAX_LIST_LIMIT} (page on "
                              "with --after, or use `waystation server export`)")
    return limit


def cmd_server_list(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`waystation server list COLLECTION [--scope S] [--limit N] [--after KEY]`."""
    limit = _limit(getattr(args, "limit", None))
    config = server_config(args, env)
    store = open_existing_store(config)
    try:
        catalog = live_schema(config, store).catalog
        check_collection(store, catalog, args.collection)
        page = list_page(store, args.collection, scope=args.scope, after=args.after,
                         limit=limit, deleted=args.deleted)
    finally:
        store.close()
    spec = catalog.collection(args.collection)
    docs = [record_doc(r, spec) for r in page.records]
    if args.json:
        print_json({"collection": args.collection, "records": docs,
                    "next_after": page.next_after})
        return 0
    if not docs:
        where = f" in scope {args.scope}" if args.scope else ""
        after = f" after {args.after!r}" if args.after else ""
        print(f"no {args.collection} records{where}{after}")
        return 0
    table(["KEY", "SCOPE", "VERSION", "UPDATED", "FIELDS"],
          [[d["key"] + (" (deleted)" if d["deleted"] else ""), d["scope"], d["version"],
            d["updated"], short(d["fields"], 80)] for d in docs])
    if page.next_after is not None:
        # The same options again, inside the quotes, so the line can be pasted as is.
        again = [f"waystation server list {args.collection} --after {page.next_after}"]
        if args.scope:
            again.append(f"--scope {args.scope}")
        if getattr(args, "limit", None) is not None:
            again.append(f"--limit {limit}")
        if args.deleted:
            again.append("--deleted")
        if getattr(args, "config", None):
            again.append(f"--config {args.config}")
        print(f"\nmore: `{' '.join(again)}`")
    return 0


def cmd_server_export(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`waystation server export [--collection C] [--scope S] [--out FILE]`: JSON lines."""
    out = getattr(args, "out", None)
    if out is not None and Path(out).exists():
        raise InvalidArgument(f"{out} exists already: name a new file (an export never "
                              "overwrites anything)")
    config = server_config(args, env)
    store = open_existing_store(config)
    try:
        catalog = live_schema(config, store).catalog
        if args.collection is not None:
            check_collection(store, catalog, args.collection)
        records = iter_records(store, args.collection, scope=args.scope, deleted=args.deleted)
        if out is None:
            count = _write_lines(sys.stdout.buffer, records, catalog)
            sys.stdout.flush()
        else:
            count = _export_file(Path(out), records, catalog)
    finally:
        store.close()
    if out is not None:
        print(f"exported {count} record{'' if count == 1 else 's'} to {out}")
    return 0


def _write_lines(fh: IO[bytes], records: Any, catalog: Any) -> int:
    count = 0
    for record in records:
        fh.write(orjson.dumps(record_doc(record, catalog.collection(record.c))) + b"\n")
        count += 1
    return count


def _export_file(path: Path, records: Any, catalog: Any) -> int:
    """Write into a temporary file next to `path`, renamed when complete: a failed
    export leaves no partial file behind."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or Path("."))
    try:
        with os.fdopen(fd, "wb") as fh:
            count = _write_lines(fh, records, catalog)
            fh.flush()
            os.fsync(fh.fileno())
        os.link(tmp, path)  # fails if `path` appeared meanwhile: never overwrite
    finally:
        os.unlink(tmp)
    return count


__all__ = ["cmd_server_export", "cmd_server_get", "cmd_server_list"]
