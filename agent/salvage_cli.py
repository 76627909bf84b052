"""Handler of `waystation agent salvage PATH [--apply] [--json]` (agent.salvage).

A dry run unless `--apply`: the operator first sees what would be queued again (and
what cannot be read, is on the server already, or is refused by the current schema),
then applies it. Salvage writes only to the current store, through the normal local
write path, so the agent service may run meanwhile (the new changes are sent at once).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

import orjson

from agent.api import Agent
from agent.opening import key_file_path
from agent.salvage import salvage
from agent.salvage_source import Report, read_old, source_dir
from agent.store import ENV_DIRNAME
from schemas.collection import load_catalog
from waystation.config import AgentConfig, load_config
from waystation.errors import ConfigError


def cmd_salvage(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`agent salvage PATH [--apply | --dry-run] [--key-file F] [--skip-uncertain] [--json]`"""
    if args.apply and args.dry_run:
        raise ConfigError("give --apply or --dry-run, not both (the default is a dry run)")
    cfg = load_config(AgentConfig, getattr(args, "config", None), env)
    current = Path(cfg.data_dir) / ENV_DIRNAME
    old = source_dir(Path(args.path), current)
    key_file = args.key_file if args.key_file is not None else key_file_path(cfg, env)
    report = read_old(old, cfg.device_id, key_file, not args.apply)
    with Agent.open(cfg, load_catalog(cfg.schema_path()), env=env) as agent:
        if report.incarnation is not None and report.incarnation == agent.status().incarnation:
            raise ConfigError(f"{old} is a copy of the agent's current store (same "
                              f"incarnation {report.incarnation}): its changes are the "
                              "current store's own; nothing to salvage")
        if args.apply:
            agent.store.verify()  # never write into a damaged current store (exit 6)
        salvage(agent, report, skip_uncertain=args.skip_uncertain)
    if args.json:
        print(orjson.dumps(report.to_dict(cfg.device_id), option=orjson.OPT_INDENT_2).decode())
    else:
        print("\n".join(_lines(report, cfg.device_id)))
    return 0


def _lines(report: Report, dev: str) -> list[str]:
    doc = report.to_dict(dev)
    c = doc["counts"]
    verb = "would queue" if report.dry_run else "queued"
    out = [f"salvage of {report.source} (device {report.device or 'unknown: meta unreadable'}, "
           f"incarnation {report.incarnation or 'unknown'}"
           + (", encrypted" if report.encrypted else "") + ")",
           f"  {c['readable']} pending change(s) read; {verb} again: {c['recovered']}"
           + (f" ({c['uncertain']} uncertain: increments or set adds that may count twice "
              "if the original reached the server)" if c["uncertain"] else ""),
           f"  already salvaged before: {c['already_salvaged']}; already on the server: "
           f"{c['already_synced']}; refused: {c['refused']}",
           f"  unreadable: {c['unreadable_entries']} change(s), "
           f"{c['unreadable_ranges']} range(s) of change numbers LMDB cannot reach"]
    for item in doc["recovered"]:
        into = f" as {item['queued_as']}" if item.get("queued_as") else ""
        flag = "  (uncertain)" if item["uncertain"] else ""
        out.append(f"  {verb} {item['change_id']}{into}: {item['op']} "
                   f"{item['collection']}/{item['key']}{flag}")
    for item in doc["refused"]:
        out.append(f"  refused {item['change_id']}: {item['reason']}")
    for bad in doc["unreadable"]["entries"]:
        out.append(f"  unreadable: {bad['reason']}")
    for first, last in doc["unreadable"]["ranges"]:
        what = f"{first}" if first == last else f"{first} and up" if last >= (1 << 52) \
            else f"{first} to {last}"
        out.append(f"  LMDB cannot reach change numbers {what} (damaged pages)")
    if report.pages:
        found = sum(1 for item in report.items if item.from_pages)
        out.append(f"  read from the raw pages instead ({report.pages} pages): {found} "
                   "change(s)")
    if report.meta_error:
        out.append(f"  the old store's meta page is unreadable ({report.meta_error})")
    if report.dry_run:
        out.append("dry run: nothing was written; run again with --apply to queue them")
    return out


__all__ = ["cmd_salvage"]
