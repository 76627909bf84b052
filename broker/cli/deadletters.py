"""`waystation server deadletters`: the input the server refused, newest first."""

from __future__ import annotations

import argparse
from collections.abc import Mapping

from broker.cli.common import DEFAULT_DEAD_LETTER_LIMIT, open_existing_store, server_config
from broker.errors import InvalidArgument
from waystation.cli.output import iso, print_json, table


def cmd_server_deadletters(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`waystation server deadletters [--limit N]`: refused input, newest first."""
    limit = getattr(args, "limit", None)
    limit = DEFAULT_DEAD_LETTER_LIMIT if limit is None else int(limit)
    if limit < 1:
        raise InvalidArgument("--limit must be at least 1")
    store = open_existing_store(server_config(args, env))
    try:
        with store.read() as txn:
            letters = txn.dead_letters(limit)
    finally:
        store.close()
    if args.json:
        print_json([{"id": d.id, "time": iso(d.t_ms), "device": d.device, "topic": d.topic,
                      "code": d.code, "reason": d.reason, "size": d.size,
                      "raw": d.raw.decode("utf-8", "replace")} for d in letters])
        return 0
    if not letters:
        print("no dead letters")
        return 0
    table(["ID", "TIME", "DEVICE", "TOPIC", "CODE", "BYTES", "REASON"],
           [[d.id, iso(d.t_ms), d.device, d.topic, d.code, d.size,
             d.reason if len(d.reason) <= 100 else d.reason[:97] + "..."] for d in letters])
    return 0


__all__ = ["cmd_server_deadletters"]
