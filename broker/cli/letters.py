"""One server dead letter at a time: `waystation server deadletters show|retry|discard`.

(`server deadletters [list]` is `broker.cli.deadletters`.) What retry does, precisely,
is `broker.server.letter_actions`; deploy/README.md says it for operators.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from typing import Any

from broker.cli.common import live_schema, now_ms, open_existing_store, server_config
from broker.errors import InvalidArgument
from broker.server import letter_actions
from broker.server.store.base import DeadLetter
from waystation.cli.output import iso, print_json
from waystation.hlc import SERVER_NODE, Clock
from waystation.rules import load_rules


def _letter_id(text: Any) -> int:
    try:
        lid = int(str(text))
    except ValueError:
        lid = 0
    if lid < 1:
        raise InvalidArgument(f"{text!r} is not a dead letter id (a number from "
                              "`waystation server deadletters list`)")
    return lid


def letter_doc(d: DeadLetter) -> dict[str, Any]:
    """A dead letter for people and scripts: `raw` is the payload as text (invalid
    UTF-8 replaced), `message` the payload parsed when it is JSON (else null)."""
    raw = d.raw.decode("utf-8", "replace")
    try:
        message = json.loads(raw) if d.size <= len(d.raw) else None
    except ValueError:
        message = None
    return {"id": d.id, "time": iso(d.t_ms), "device": d.device, "topic": d.topic,
            "code": d.code, "reason": d.reason, "size": d.size,
            "truncated": d.size > len(d.raw), "raw": raw, "message": message}


def cmd_server_deadletters_show(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`waystation server deadletters show ID [--json]`."""
    lid = _letter_id(args.letter_id)
    store = open_existing_store(server_config(args, env))
    try:
        doc = letter_doc(letter_actions.get_letter(store, lid))
    finally:
        store.close()
    if args.json:
        print_json(doc)
        return 0
    print(f"dead letter {doc['id']}  {doc['time']}  from {doc['device']} ({doc['topic']} "
          f"topic), {doc['size']} bytes" + (", cut to 64 KiB" if doc["truncated"] else ""))
    print(f"refused: {doc['code']}: {doc['reason']}")
    print("payload:")
    if doc["message"] is not None:
        print(json.dumps(doc["message"], indent=2, ensure_ascii=False))
    else:
        print(ascii(doc["raw"])[1:-1])  # control bytes escaped, never sent to the terminal
    return 0


def cmd_server_deadletters_retry(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`waystation server deadletters retry ID [--json]`: intake and merge once more."""
    lid = _letter_id(args.letter_id)
    config = server_config(args, env)
    rules = load_rules(config.merge.rules)
    store = open_existing_store(config)
    try:
        result = letter_actions.retry(store, live_schema(config, store), config.merge,
                                      Clock(SERVER_NODE, now_ms), lid, now_ms, rules)
    finally:
        store.close()
    if args.json:
        print_json(result.to_json())
        return 0 if result.removed else 1
    if result.code:
        print(f"dead letter {lid} is still refused: {result.code}: {result.reason}; it is kept")
        return 1
    for ch in result.changes:
        where = f" (scope {ch.scope}, version {ch.q})" if ch.scope else ""
        why = f": {ch.code}: {ch.reason}" if ch.code else ""
        print(f"change {result.device}:{ch.n}: {ch.result.replace('_', ' ')}{where}{why}")
    if result.removed:
        print(f"dead letter {lid} removed: every change has its final answer; the running "
              "server sends what was applied to the online devices of its scopes")
        return 0
    print(f"dead letter {lid} kept: some changes were refused for now; retry it later")
    return 1


def cmd_server_deadletters_discard(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`waystation server deadletters discard ID | --all-for DEVICE [--json]`."""
    if (args.letter_id is None) == (args.all_for is None):
        raise InvalidArgument("name one dead letter id, or --all-for DEVICE")
    store = open_existing_store(server_config(args, env))
    try:
        if args.letter_id is not None:
            lid = _letter_id(args.letter_id)
            letter_actions.discard(store, lid)
            count, what = 1, f"dead letter {lid}"
        else:
            count = letter_actions.discard_device(store, args.all_for)
            what = f"{count} dead letter(s) of {args.all_for}"
    finally:
        store.close()
    if args.json:
        print_json({"discarded": count})
        return 0
    print(f"discarded {what}")
    return 0


__all__ = ["cmd_server_deadletters_discard", "cmd_server_deadletters_retry",
           "cmd_server_deadletters_show", "letter_doc"]
