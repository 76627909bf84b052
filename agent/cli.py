"""Handlers of the `waystation agent ...` commands that read and write the local store.

The parser is `waystation.cli`; it calls ``cmd_<name>(args, env)`` and prints any
`WaystationError` as one line ``error: <message>`` with its exit code. Writes print
"saved locally (change van-1:17), pending sync"; reads take ``--json``. `agent run`
(the daemon) lives with the MQTT code, not here.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import orjson

from agent import validate
from agent.api import Agent
from agent.clientcert import client_cert_status, describe_client_cert
from agent.errors import AgentNotInitialised, BadRequest, NotFound, WriteRefused
from agent.models import Conflict, Record, WriteResult
from agent.status import describe_deferral, sync_running
from schemas.collection import Catalog, load_catalog
from waystation.cli.output import table
from waystation.config import AgentConfig, load_config
from waystation.timefmt import iso

EXIT_OK = 0
EXIT_ERROR = 1


def _setup(args: argparse.Namespace, env: Mapping[str, str]) -> tuple[AgentConfig, Catalog]:
    cfg = load_config(AgentConfig, getattr(args, "config", None), env)
    return cfg, load_catalog(cfg.schema_path())


def _open(args: argparse.Namespace, env: Mapping[str, str], *, create: bool) -> Agent:
    cfg, catalog = _setup(args, env)
    return _open_with(args, cfg, catalog, env, create=create)


def _open_with(args: argparse.Namespace, cfg: AgentConfig, catalog: Catalog,
               env: Mapping[str, str], *, create: bool, readonly: bool = False) -> Agent:
    try:
        return Agent.open(cfg, catalog, create=create, env=env, readonly=readonly)
    except AgentNotInitialised as exc:
        raise AgentNotInitialised(f"{exc}{_no_store_hint(args)}") from None


def _no_store_hint(args: argparse.Namespace) -> str:
    """What to do about a store not created yet. Without --config the command looked in
    ./waystation-data/agent: most likely the agent runs with a config file elsewhere. With
    it, the store is where the agent runs: it has not started (or written) yet."""
    config = getattr(args, "config", None)
    if config is None:
        return (" (write a record or start `waystation agent run` first); an agent that runs "
                "with a config file keeps its store where that file says: give this command "
                "the same `--config FILE`")
    return (f" (in the data_dir that {config} names): start the agent first (`waystation "
            f"agent run --config {config}`, or its systemd unit), or write a record")


def _print_json(doc: Any) -> None:
    print(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())


def _show_write(args: argparse.Namespace, result: WriteResult) -> None:
    """A write's outcome: one line for people, or with --json its `to_dict()`."""
    if getattr(args, "json", False):
        _print_json(result.to_dict())
    else:
        print(result.message)


def _compact(value: Any) -> str:
    return orjson.dumps(value).decode()


# --------------------------------------------------------------------- writes


def cmd_run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`waystation agent run`: the agent service in the foreground: the local API and the
    supervised sync process (`agent.service`)."""
    from agent.service.main import run
    from waystation.logs import configure_logging

    path = getattr(args, "config", None)
    cfg = load_config(AgentConfig, path, env)
    configure_logging(cfg.log)
    return run(cfg, Path(path).resolve() if path else None, env=env)


def cmd_put(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`agent put COLLECTION KEY FIELD=VALUE...`"""
    cfg, catalog = _setup(args, env)
    spec = validate.collection(catalog, args.collection)
    values: dict[str, Any] = {}
    for name, value in args.fields:
        if name in values:
            raise WriteRefused("invalid", f"field {name!r} is given twice")
        fspec = spec.fields.get(name)
        if (fspec is not None and fspec.type == "json" and isinstance(value, str)
                and value.lstrip()[:1] in ("{", "[")):
            raise WriteRefused("invalid", f"{spec.name}.{name}: {value!r} looks like JSON but "
                                          "does not parse (quote text as a JSON string)")
        values[name] = value
    with Agent.open(cfg, catalog, env=env) as agent:
        _show_write(args, agent.put(spec.name, args.key, values))
    return EXIT_OK


def cmd_delete(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`agent delete COLLECTION KEY`"""
    cfg, catalog = _setup(args, env)
    validate.collection(catalog, args.collection)
    with Agent.open(cfg, catalog, env=env) as agent:
        _show_write(args, agent.delete(args.collection, args.key))
    return EXIT_OK


def cmd_incr(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`agent incr COLLECTION KEY FIELD AMOUNT`"""
    cfg, catalog = _setup(args, env)
    spec = validate.collection(catalog, args.collection)
    validate.increment(spec, args.field, args.amount)
    with Agent.open(cfg, catalog, env=env) as agent:
        _show_write(args, agent.increment(args.collection, args.key, args.field, args.amount))
    return EXIT_OK


def cmd_add(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`agent add COLLECTION KEY FIELD MEMBER...`"""
    cfg, catalog = _setup(args, env)
    spec = validate.collection(catalog, args.collection)
    validate.members(spec, args.field, args.members)
    with Agent.open(cfg, catalog, env=env) as agent:
        _show_write(args, agent.add(args.collection, args.key, args.field, args.members))
    return EXIT_OK


def cmd_remove(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`agent remove COLLECTION KEY FIELD MEMBER...`"""
    cfg, catalog = _setup(args, env)
    spec = validate.collection(catalog, args.collection)
    validate.members(spec, args.field, args.members)
    with Agent.open(cfg, catalog, env=env) as agent:
        _show_write(args, agent.remove(args.collection, args.key, args.field, args.members))
    return EXIT_OK


# ---------------------------------------------------------------------- reads


def _record_lines(record: Record) -> list[str]:
    state = (f"{record.pending} change{'s' if record.pending != 1 else ''} pending sync"
             if record.pending else "synced")
    version = f"version {record.version}" if record.version else "not yet on the server"
    lines = [f"{record.collection}/{record.key}  (scope {record.scope}, {version}, {state})"]
    if record.deleted:
        lines.append("  deleted")
    width = max((len(name) for name in record.fields), default=0)
    for name, value in record.fields.items():
        note = record.sync.get(name, "synced")
        extra = ""
        if name in record.conflicts:
            extra = f"  candidates: {_compact([c['v'] for c in record.conflicts[name]])}"
        lines.append(f"  {name:<{width}}  {_compact(value)}  {note}{extra}")
    return lines


def cmd_get(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`agent get COLLECTION KEY [--json]`"""
    with _open(args, env, create=False) as agent:
        record = agent.get(args.collection, args.key)
    if record is None:
        raise NotFound(f"no record {args.collection}/{args.key} on this device")
    if args.json:
        _print_json(record.to_dict())
    else:
        print("\n".join(_record_lines(record)))
    return EXIT_OK


def cmd_list(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`agent list COLLECTION [--json]`"""
    with _open(args, env, create=False) as agent:
        records = agent.list(args.collection)
    if args.json:
        _print_json([r.to_dict() for r in records])
        return EXIT_OK
    if not records:
        print(f"no {args.collection} records on this device")
        return EXIT_OK
    table(["KEY", "SYNC", "FIELDS"],
          [[r.key, f"{r.pending} pending" if r.pending else "synced", _compact(r.fields)]
           for r in records])
    return EXIT_OK


def _print_records(records: list[Record]) -> None:
    """What a fetch brought back, as the table `agent list` prints (none: no table)."""
    if records:
        table(["KEY", "FIELDS"], [[r.key, _compact(r.fields)] for r in records])


def cmd_fetch(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`agent fetch COLLECTION KEY... [--wait S] [--json]`, or `agent fetch COLLECTION
    --where JSON [--limit N] [--after KEY] [--wait S] [--json]`"""
    if args.where is not None:
        if args.keys:
            raise BadRequest("invalid", "give record keys or --where, not both")
        return _fetch_query(args, env)
    if not args.keys:
        raise BadRequest("invalid", "name the record keys to fetch, or a filter with --where")
    if args.limit is not None or args.after is not None:
        raise BadRequest("invalid", "--limit and --after go with --where (a fetch by query)")
    with _open(args, env, create=True) as agent:
        result = agent.fetch(args.collection, args.keys, wait_s=args.wait)
        running = agent.status().agent_running
    if args.json:
        _print_json(result.to_dict())
        return EXIT_OK
    _print_records(result.records)
    if result.waiting:
        print(f"asked the server for {len(result.waiting)} record(s): "
              f"{', '.join(result.waiting)}")
        if not running:
            print("  the sync daemon is not running: they come once `waystation agent run` "
                  "(or its service) is connected")
    if result.missing:
        print(f"the server holds none of: {', '.join(result.missing)}")
    return EXIT_OK


def _fetch_query(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    try:
        where = json.loads(args.where)
    except ValueError as exc:
        raise BadRequest("invalid", f"--where is not JSON: {exc}") from None
    if not isinstance(where, dict):
        raise BadRequest("invalid", "--where must be a JSON object: field -> value or conditions")
    with _open(args, env, create=True) as agent:
        limit = 100 if args.limit is None else args.limit
        result = agent.fetch_query(args.collection, where, limit=limit,
                                   after=args.after, wait_s=args.wait)
        running = agent.status().agent_running
    if args.json:
        _print_json(result.to_dict())
        return EXIT_ERROR if result.state == "failed" else EXIT_OK
    _print_records(result.records)
    if result.state == "waiting":
        print(f"asked the server (fetch query {result.id}); the records come when it answers")
        if not running:
            print("  the sync daemon is not running: they come once `waystation agent run` "
                  "(or its service) is connected")
    elif result.state == "failed" and result.error:
        print(f"the server cannot answer this filter: {result.error.get('reason', '')}",
              file=sys.stderr)
        return EXIT_ERROR
    else:
        print(f"{len(result.records)} record(s) brought back; the server read "
              f"{result.scanned}")
        if result.next is not None:
            why = ("the limit was reached" if result.stop == "limit"
                   else "the server's scan budget was spent")
            print(f"  more may match ({why}): go on with --after {result.next}")
    return EXIT_OK


def cmd_sync_now(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`agent sync [--json]`"""
    with _open(args, env, create=False) as agent:
        req = agent.sync_now()
        status = agent.status()
    if args.json:
        _print_json({"requested_ms": req["t"], "pending": status.pending,
                     "agent_running": status.agent_running, "deferred": status.deferred})
        return EXIT_OK
    if not status.agent_running:
        print("sync now recorded, but the sync daemon is not running: start `waystation "
              "agent run` (or its service) within policy.sync_now_s")
    else:
        print(f"sync now asked: {status.pending} pending change(s) go now")
    for d in status.deferred:
        if d.get("code") == "server_unavailable":
            print(f"  still waiting: {describe_deferral(d)}")
    return EXIT_OK


def cmd_status(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`agent status [--json]`"""
    cfg, catalog = _setup(args, env)
    # Read-only: answers even while the daemon is stuck inside a write transaction.
    with _open_with(args, cfg, catalog, env, create=False, readonly=True) as agent:
        status = agent.status()
    cert = client_cert_status(cfg)
    if args.json:
        # The same document as GET /v1/status (which has `client_cert` too).
        _print_json({**status.to_dict(), "sync_running": sync_running(status),
                     "client_cert": cert})
        return EXIT_OK
    print(status.summary())
    if cert is not None:
        print(f"  client certificate: {describe_client_cert(cert)}")
    print(f"  device {status.device_id}, schema version {status.schema_version}, "
          f"next change {status.device_id}:{status.next_n}")
    print(f"  store {status.store_path} (incarnation {status.incarnation or 'legacy'})")
    if status.link is not None and status.link["code"] != "sync_restarting":
        print(f"  last connection attempt: {status.link['code']}: {status.link['reason']}")
    if status.wiped:
        print(f"  wiped by the operator at {iso(status.wiped['t'])} "
              f"(command {status.wiped['id']}); "
              + ("enabled again since: it has synced after the wipe"
                 if status.synced_since_wipe
                 else "the server sends no data until the device is enabled again"))
    cps = ", ".join(f"{scope} {cp}" for scope, cp in status.checkpoints.items())
    print(f"  checkpoints: {cps}")
    if status.gaps:
        print(f"  waiting for missed changes in: {', '.join(status.gaps)}")
    if status.snapshots:
        print(f"  re-downloading: {', '.join(status.snapshots)}")
    if status.last_error:
        print(f"  last problem: {status.last_error['code']}: {status.last_error['reason']}")
    if status.quota is not None:
        print(f"  disk quota: {status.quota['used']} of {status.quota['limit']} bytes used"
              + (" -- REACHED: local writes are refused" if status.quota["reached"] else ""))
    if status.evicted or status.fetching or status.fetch_queries:
        print(f"  retention: {status.evicted} record(s) evicted, {status.fetching} asked back, "
              f"{status.fetch_queries} fetch quer{'y' if status.fetch_queries == 1 else 'ies'} "
              "waiting (`waystation agent fetch COLLECTION KEY` or `--where FILTER`)")
    return EXIT_OK


def cmd_deadletters(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`agent deadletters [--json]`"""
    with _open(args, env, create=False) as agent:
        letters = agent.dead_letters()
    if args.json:
        _print_json([d.to_dict() for d in letters])
        return EXIT_OK
    if not letters:
        print("no dead letters: the server has refused none of this device's changes")
    for d in letters:
        ch = d.change
        parts = [f"{label} {name} {value}" for label, name, value in change_fields(ch)]
        print(f"{d.change_id}  {d.code}: {d.reason}")
        print(f"  {ch['op']} {ch['c']}/{ch['k']}" + (f": {', '.join(parts)}" if parts else ""))
        if d.transaction is not None:  # rejected, and rolled back, with its transaction
            print(f"  in transaction {d.transaction}")
    return EXIT_OK


_CHANGE_GROUPS = (("f", "set"), ("i", "add to counter"), ("a", "add to set"),
                  ("r", "remove from set"))


def change_fields(ch: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(what, field, value as JSON) of a stored change, in words: the change's wire
    groups (`f`, `i`, `a`, `r`) are not what an operator or app developer reads."""
    out = []
    for group, label in _CHANGE_GROUPS:
        for name, value in (ch.get(group) or {}).items():
            shown = sorted(value) if group in ("a", "r") and isinstance(value, list) else value
            out.append((label, name, _compact(shown)))
    return out


def cmd_conflicts(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`agent conflicts [--json]`"""
    with _open(args, env, create=False) as agent:
        conflicts = agent.conflicts()
    if args.json:
        _print_json([c.to_dict() for c in conflicts])
        return EXIT_OK
    if not conflicts:
        print("no conflicts")
        return EXIT_OK
    table(["STATE", "RECORD", "FIELD", "KEPT", "CONCURRENT"],
          [[c.kind, f"{c.collection}/{c.key}", c.field, _compact(c.value), _concurrent(c)]
           for c in conflicts])
    print()
    if any(c.kind == "open" for c in conflicts):
        print("open: the kept value stands until a person decides (`waystation server "
              "resolve` on the server)")
    if any(c.kind == "lost" for c in conflicts):
        print("lost: this device's write lost to the kept value")
    return EXIT_OK


def _concurrent(c: Conflict) -> str:
    """What was written beside the kept value, and by whom (as `server conflicts` says)."""
    if c.kind == "open":
        return ", ".join(f"{_compact(cand['v'])} by {cand.get('by', '?')}"
                         for cand in c.candidates)
    mine = c.candidates[0]["v"] if c.candidates else None
    return f"{_compact(mine)} by this device ({c.change_id})"


def cmd_watch(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`agent watch [COLLECTION] [--json]`: follow changes until Ctrl-C."""
    with _open(args, env, create=False) as agent:
        if args.collection is not None:
            agent.list(args.collection, limit=0)  # BadRequest for an unknown collection
        try:
            events = agent.watch(args.collection, since=getattr(args, "since", None),
                                 timeout=getattr(args, "timeout", None))
            _print_events(events, args.json)
        except KeyboardInterrupt:
            pass
    return EXIT_OK


def _print_events(events: Iterable[Any], as_json: bool) -> None:
    for event in events:
        if as_json:
            line = _compact(event.to_dict())
        elif event.collection:
            line = f"{event.seq}  {event.kind:<8}  {event.collection}/{event.key}"
        else:
            line = f"{event.seq}  {event.kind}"
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


__all__ = [
    "cmd_add",
    "cmd_conflicts",
    "cmd_deadletters",
    "cmd_delete",
    "cmd_get",
    "cmd_incr",
    "cmd_list",
    "cmd_put",
    "cmd_remove",
    "cmd_status",
    "cmd_watch",
]
