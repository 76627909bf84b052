"""Operator commands of the server side (`waystation server ...`, `waystation device ...`).

Each handler is `cmd_x(args, env) -> int` (see `waystation.cli`). They work on the store
directly, so they run next to a live server (LMDB allows several processes; the server
notices registry changes and queued resolutions at its next tick). Output is a table
for people, or one JSON document with `--json`. Errors are `WaystationError`s, which
the entry point prints as one line with a non-zero exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.errors import InvalidArgument
from broker.server import devstate, registry
from broker.server.operations import after_restore, resolve_conflict
from broker.server.store import open_store
from broker.server.store.base import DeadLetterStats, Store
from schemas.collection import Catalog, load_catalog
from waystation.config import AgentConfig, BrokerConfig, ServerConfig, dump_toml, load_config
from waystation.hlc import SERVER_NODE, Clock

DEFAULT_DEAD_LETTER_LIMIT = 50


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _config(args: argparse.Namespace, env: Mapping[str, str]) -> ServerConfig:
    return load_config(ServerConfig, getattr(args, "config", None), env)


def _catalog(config: ServerConfig) -> Catalog:
    return load_catalog(config.schema_path())


def _print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2, ensure_ascii=False, default=str))


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _ago(ms: int, now: int) -> str:
    if not ms:
        return "never"
    secs = max(0, (now - ms) // 1000)
    if secs < 60:
        return f"{secs}s ago"
    if secs < 3600:
        return f"{secs // 60}m ago"
    if secs < 86400:
        return f"{secs // 3600}h ago"
    return f"{secs // 86400}d ago"


def _iso(ms: int) -> str:
    if not ms:
        return ""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


def _short(value: Any, limit: int = 40) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------- daemons

def cmd_server_run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`waystation server run`: the merge server in the foreground (`broker.server.daemon`)."""
    from broker.server.daemon import run
    from waystation.logs import configure_logging

    config = _config(args, env)
    configure_logging(config.log)
    return run(config, env=env)


def cmd_broker_run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`waystation broker run`: the embedded MQTT broker (`broker.embedded.amqtt_broker`)."""
    from broker.embedded.amqtt_broker import broker_run

    return broker_run(args, env)


def cmd_broker_passwd(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`waystation broker passwd USER`: add or change a login in the password file."""
    from broker.embedded.passwords import write_password_entry
    from waystation.config import BrokerConfig

    user = str(args.user)
    if not user or any(c in user for c in ":\n\r") or len(user) > 128:
        raise InvalidArgument(f"{user!r} is not a usable login name (no ':' or newlines)")
    path = getattr(args, "password_file", None)
    if path is None:
        path = load_config(BrokerConfig, getattr(args, "config", None), env,
                           part="broker").resolved_password_file()
    if getattr(args, "stdin", False):
        password = sys.stdin.readline().rstrip("\r\n")
        if len(password) < 8:
            raise InvalidArgument("the password read from standard input is shorter than "
                                  "8 characters")
        generated = False
    else:
        password = secrets.token_urlsafe(24)
        generated = True
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_password_entry(Path(path), user, password)
    print(f"login {user} written to {path} (Mosquitto reloads it on SIGHUP; the embedded "
          "broker picks it up at the next connection)")
    if generated:
        print(f"password: {password}")
    return 0


# --------------------------------------------------------------------- server ...

def cmd_server_status(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`waystation server status`: store, schema, devices, sequences, conflicts."""
    config = _config(args, env)
    catalog = _catalog(config)
    store = open_store(config)
    try:
        info = store.info()
        with store.read() as txn:
            devices = txn.devices()
            seqs = txn.scope_seqs()
            horizons = {s: txn.purge_horizon(s) for s in seqs}
            letters = txn.dead_letter_stats()
    finally:
        store.close()
    online = sorted(d.id for d in devices if d.online)
    doc: dict[str, Any] = {
        "server_id": config.server_id,
        "store": {"kind": info.kind, "location": info.location, "size_bytes": info.size_bytes,
                  "capacity_bytes": info.capacity_bytes},
        "schema": {"file": str(config.schema_path()), "version": catalog.version},
        "devices": {"known": len(devices), "enabled": sum(d.enabled for d in devices),
                    "online": len(online)},
        "scopes": {s: {"seq": q, "purged_to": horizons[s]} for s, q in sorted(seqs.items())},
        "records": info.counts["records"],
        "open_conflicts": info.counts["open_conflicts"],
        "conflicts": info.counts["conflicts"],
        "dead_letters": info.counts["dead_letters"],
        "dead_letter_store": {**letters.to_json(), "oldest": _iso(letters.oldest_ms),
                              "max_count": config.dead_letters.max_count,
                              "max_bytes": config.dead_letters.max_bytes,
                              "max_age_s": config.dead_letters.max_age_s},
        "pending_notices": info.counts["notices"],
    }
    if args.json:
        _print_json(doc)
        return 0
    size = f"{info.size_bytes / 1048576:.1f} MiB used"
    if info.capacity_bytes:
        size += f" of {info.capacity_bytes / 1048576:.0f} MiB"
    print(f"server {config.server_id}: {info.kind} store at {info.location}, {size}")
    print(f"schema version {catalog.version} ({config.schema_path()})")
    print(f"devices: {len(devices)} known, {doc['devices']['enabled']} enabled, "
          f"{len(online)} online" + (f" ({', '.join(online[:10])}"
                                     f"{', ...' if len(online) > 10 else ''})" if online else ""))
    print(f"records: {doc['records']}; open conflicts: {doc['open_conflicts']} "
          f"(of {doc['conflicts']} logged); dead letters: {doc['dead_letters']}")
    print(_letters_line(letters, config.dead_letters.max_count,
                        config.dead_letters.max_bytes))
    if seqs:
        print()
        _table(["SCOPE", "SEQUENCE", "PURGED TO"],
               [[s, q, horizons[s] or "-"] for s, q in sorted(seqs.items())])
    return 0


def _letters_line(st: DeadLetterStats, max_count: int, max_bytes: int) -> str:
    """What the dead letters hold against their bounds, and what the bounds dropped."""
    line = (f"dead letters kept: {st.count} of at most {max_count}, "
            f"{st.bytes / 1048576:.1f} of {max_bytes / 1048576:.0f} MiB")
    if st.count:
        line += f", oldest {_iso(st.oldest_ms)}"
    if st.truncated:
        line += f"; {st.truncated} with their raw payload cut"
    line += (f"; dropped by the bounds: {st.dropped} ({st.dropped_bytes / 1048576:.1f} MiB)"
             if st.dropped else "; none dropped by the bounds")
    return line


def cmd_server_devices(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`waystation server devices`: devices with scopes, presence and progress."""
    store = open_store(_config(args, env))
    try:
        with store.read() as txn:
            devices = txn.devices()
            seqs = txn.scope_seqs()
    finally:
        store.close()
    if args.json:
        _print_json([devstate.device_doc(d, seqs) for d in devices])
        return 0
    if not devices:
        print("no devices registered (add one with `waystation device add ID --scope S`)")
        return 0
    now = _now_ms()
    rows = []
    for d in devices:
        rows.append([d.id, devstate.presence(d), _ago(d.last_seen_ms, now),
                     _ago(d.synced_ms, now), d.agent or "-", "-" if d.pend < 0 else d.pend,
                     devstate.progress(d, seqs)])
    _table(["DEVICE", "STATE", "LAST SEEN", "LAST SYNC", "AGENT", "PENDING",
            "REPORTED CHECKPOINT / SEQ"], rows)
    return 0


def cmd_server_conflicts(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`waystation server conflicts [--all]`: open conflicts (or the whole log)."""
    show_all = bool(getattr(args, "all", False))
    limit = getattr(args, "limit", None)
    limit = 1000 if limit is None else int(limit)
    if limit < 1:
        raise InvalidArgument("--limit must be at least 1")
    store = open_store(_config(args, env))
    try:
        with store.read() as txn:
            rows = txn.conflicts(open_only=not show_all, limit=limit)
    finally:
        store.close()
    if args.json:
        _print_json([r.to_json() for r in rows])
        return 0
    if not rows:
        print("no open conflicts" if not show_all else "the conflict log is empty")
        return 0
    now = _now_ms()
    table = []
    for r in rows:
        winner = r.entry.get("winner") or {}
        loser = r.entry.get("loser") or {}
        table.append([r.id, "open" if r.open else "closed", f"{r.c}/{r.k}", r.s, r.field,
                      r.entry.get("kind", ""),
                      f"{_short(winner.get('v'))} by {winner.get('by', '?')}" if winner else "-",
                      f"{_short(loser.get('v'))} by {loser.get('by', '?')}",
                      _ago(r.created_ms, now)])
    _table(["ID", "STATE", "RECORD", "SCOPE", "FIELD", "KIND", "KEPT", "CONCURRENT", "AGE"],
           table)
    if not show_all:
        print("\nsettle one with `waystation server resolve ID VALUE`")
    return 0


def cmd_server_resolve(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`waystation server resolve CONFLICT_ID VALUE`: write VALUE and close the conflict."""
    try:
        cid = int(str(args.conflict_id))
    except ValueError:
        raise InvalidArgument(f"{args.conflict_id!r} is not a conflict id (a number, see "
                              "`waystation server conflicts`)") from None
    config = _config(args, env)
    catalog = _catalog(config)
    store = open_store(config)
    try:
        now = _now_ms()
        res = resolve_conflict(store, catalog, Clock(SERVER_NODE, _now_ms), cid, args.value, now)
    finally:
        store.close()
    if getattr(args, "json", False):
        _print_json({"conflict": res.conflict_id, "record": f"{res.c}/{res.k}", "scope": res.s,
                     "field": res.field, "value": res.value, "q": res.q,
                     "closed": list(res.closed)})
        return 0
    print(f"resolved conflict {res.conflict_id}: {res.c}/{res.k} {res.field} = "
          f"{_short(res.value, 80)} (scope {res.s}, version {res.q}); closed "
          f"{len(res.closed)} conflict(s). The running server sends it to the online devices "
          "of the scope; the others get it when they catch up.")
    return 0


def cmd_server_backup(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`waystation server backup DEST`: a consistent copy of the LMDB store."""
    config = _config(args, env)
    if config.store.kind != "lmdb":
        raise InvalidArgument(
            "`server backup` copies the LMDB store; this server uses PostgreSQL, which is "
            "backed up with PostgreSQL's own tools (pg_dump): see deploy/README.md, "
            "\"Backups\"")
    from broker.server.store.lmdb_store import LmdbStore

    store = open_store(config)
    try:
        assert isinstance(store, LmdbStore)
        with store.read() as txn:
            seqs = txn.scope_seqs()
        data = store.backup(Path(args.dest))
    finally:
        store.close()
    size = data.stat().st_size
    if args.json:
        _print_json({"backup": str(Path(args.dest)), "bytes": size,
                     "scopes": dict(sorted(seqs.items()))})
        return 0
    print(f"backed up the store to {args.dest} ({size / 1048576:.1f} MiB, "
          f"{len(seqs)} scopes)")
    print(f"restore: stop the server, move {config.data_dir / 'store'} aside, run "
          f"`waystation server restore {args.dest}`, start the server")
    return 0


def cmd_server_restore(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`waystation server restore SRC | --in-place`: a restored store made safe to serve."""
    config = _config(args, env)
    if (args.src is None) == (not args.in_place):
        raise InvalidArgument("name a backup directory (SRC), or say --in-place for a store "
                              "already restored by other means (e.g. pg_restore)")
    if args.src is not None:
        if config.store.kind != "lmdb":
            raise InvalidArgument(
                "SRC is an LMDB store backup; this server uses PostgreSQL: restore the "
                "database with pg_restore, then run `waystation server restore --in-place` "
                "(see deploy/README.md, \"Backups\")")
        from broker.server.store.lmdb_store import restore_backup

        store: Store = restore_backup(Path(args.src), config.data_dir,
                               map_size_mb=config.store.map_size_mb,
                               max_map_size_mb=config.store.max_map_size_mb)
    else:
        store = open_store(config)
    try:
        seqs = after_restore(store)
    finally:
        store.close()
    if args.json:
        _print_json({"restored": str(args.src) if args.src else "in place",
                     "scopes": dict(sorted(seqs.items()))})
        return 0
    print(f"restored {'the store in place' if args.src is None else args.src} "
          f"({len(seqs)} scopes): every device resyncs its scopes by snapshot on its next "
          "catch-up, keeping its pending writes")
    return 0


def cmd_server_deadletters(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`waystation server deadletters [--limit N]`: refused input, newest first."""
    limit = getattr(args, "limit", None)
    limit = DEFAULT_DEAD_LETTER_LIMIT if limit is None else int(limit)
    if limit < 1:
        raise InvalidArgument("--limit must be at least 1")
    store = open_store(_config(args, env))
    try:
        with store.read() as txn:
            letters = txn.dead_letters(limit)
    finally:
        store.close()
    if args.json:
        _print_json([{"id": d.id, "time": _iso(d.t_ms), "device": d.device, "topic": d.topic,
                      "code": d.code, "reason": d.reason, "size": d.size,
                      "raw": d.raw.decode("utf-8", "replace")} for d in letters])
        return 0
    if not letters:
        print("no dead letters")
        return 0
    _table(["ID", "TIME", "DEVICE", "TOPIC", "CODE", "BYTES", "REASON"],
           [[d.id, _iso(d.t_ms), d.device, d.topic, d.code, d.size,
             d.reason if len(d.reason) <= 100 else d.reason[:97] + "..."] for d in letters])
    return 0


# --------------------------------------------------------------------- device ...

def _password_file(env: Mapping[str, str]) -> Path:
    """The broker's password file (from the broker config's environment overrides)."""
    return load_config(BrokerConfig, None, env).resolved_password_file()


def cmd_device_add(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`waystation device add ID --scope S ... [--out DIR]`: enrol a device."""
    config = _config(args, env)
    dev = registry.check_id("device id", args.device_id)
    scopes = list(args.scopes or [])
    for scope in scopes:
        registry.check_id("scope", scope)
    out_dir = Path(args.out) if getattr(args, "out", None) is not None else Path.cwd()
    agent_file = out_dir / f"{dev}.toml"
    if agent_file.exists():
        raise InvalidArgument(f"{agent_file} already exists; remove it or choose another --out")
    password = secrets.token_urlsafe(24)
    enrol = config.enrol
    client_cert = enrol.client_ca_cert is not None
    layout = SYSTEMD_LAYOUT if getattr(args, "systemd", False) else PORTABLE_LAYOUT
    agent = _agent_config(config, dev, scopes, password, layout,  # validate before writing
                          client_cert=client_cert)
    if enrol.ca_file is not None and not Path(enrol.ca_file).is_file():
        raise InvalidArgument(f"enrol.ca_file {enrol.ca_file} does not exist: point it at the "
                              "CA certificate devices verify the broker with")
    store = open_store(config)
    try:
        row = registry.add_device(store, dev, scopes, _now_ms())
    finally:
        store.close()
    pw_note = _write_credentials(env, dev, password, enrol.password_file,
                                 where=("in " + f"{dev}.mqtt-password" if layout.password_file
                                        else "in the agent config"))
    out_dir.mkdir(parents=True, exist_ok=True)
    if enrol.ca_file is not None:
        shutil.copyfile(enrol.ca_file, out_dir / "ca.pem")
    if layout.password_file is not None:
        _write_private(out_dir / f"{dev}.mqtt-password", password + "\n")
    if enrol.client_ca_cert is not None and enrol.client_ca_key is not None:
        from broker.embedded.certs import issue_client_cert

        issued = issue_client_cert(enrol.client_ca_cert, enrol.client_ca_key, dev, out_dir,
                                   days=enrol.client_cert_days)
        pw_note += f"; client certificate {issued.cert_path} (key {issued.key_path})"
    if config.schema_file is not None:
        shutil.copyfile(config.schema_path(), out_dir / layout.schema_name.format(dev=dev))
    text = dump_toml(agent, mask_secrets=False, exclude_defaults=True, header=layout.header(dev))
    _write_private(agent_file, text, exclusive=True)
    if getattr(args, "json", False):
        _print_json({"device": dev, "scopes": list(row.scopes), "agent_config": str(agent_file),
                     "credentials": pw_note})
        return 0
    print(f"device {dev} registered with scopes {', '.join(row.scopes)}")
    print(f"agent config written to {agent_file} (broker {agent.mqtt.host}:{agent.mqtt.port}; "
          "edit mqtt.host if the device reaches the broker under another name)")
    print(pw_note)
    return 0


@dataclass(frozen=True)
class AgentLayout:
    """Where the files `device add` writes live on the device, as the agent config
    names them. Portable: everything next to the config (relative paths resolve
    against the config file's directory). systemd: the unit's fixed locations."""

    directory: str
    """Prefix for ca.pem, the schema and client certificates ("" = next to the config)."""
    data_dir: str
    """The store's directory ("{dev}" is the device id); relative: next to the config."""
    password_file: str | None
    """None: the password goes inline into the config."""
    schema_name: str

    def path(self, name: str) -> str:
        return f"{self.directory}{name}"

    def header(self, dev: str) -> str:
        if self.password_file is None:
            return (f"Waystation agent config for device {dev} (written by `waystation device "
                    "add`).\nCopy it (with the files next to it) to the device and run "
                    "`waystation agent run --config FILE`.\nIt holds the device's broker "
                    "password: keep it private (mode 0600).")
        return (f"Waystation agent config for device {dev} (written by `waystation device add "
                f"--systemd`).\nInstall as /etc/waystation/agent-{dev}.toml; ca.pem and the "
                "schema into /etc/waystation/,\nthe .mqtt-password file as "
                f"/etc/waystation/credentials/agent-{dev}-mqtt-password (mode 0600); then\n"
                f"systemctl enable --now waystation-agent@{dev} (its StateDirectory is "
                "data_dir below).")


PORTABLE_LAYOUT = AgentLayout("", "{dev}-data", None, "{dev}.schema.toml")
SYSTEMD_LAYOUT = AgentLayout("/etc/waystation/", "/var/lib/waystation/agent-{dev}",
                             "${CREDENTIALS_DIRECTORY}/mqtt-password", "fleet.toml")


def _write_private(path: Path, text: str, *, exclusive: bool = False) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)


def _agent_config(config: ServerConfig, dev: str, scopes: list[str], password: str,
                  layout: AgentLayout = PORTABLE_LAYOUT, *,
                  client_cert: bool = False) -> AgentConfig:
    enrol = config.enrol
    mqtt: dict[str, Any] = {
        "host": enrol.broker_host or config.mqtt.host,
        "port": enrol.broker_port or config.mqtt.port,
        "prefix": config.mqtt.prefix}
    if layout.password_file is None:
        mqtt["password"] = password
    else:
        mqtt["password_file"] = layout.password_file
    if enrol.ca_file is not None:
        # Portable layout: relative paths resolve next to the agent config on the device.
        tls: dict[str, Any] = {"ca_file": layout.path("ca.pem")}
        if enrol.server_hostname:
            tls["server_hostname"] = enrol.server_hostname
        if client_cert:
            tls["cert_file"] = layout.path(f"{dev}.crt")
            tls["key_file"] = layout.path(f"{dev}.key")
        mqtt["tls"] = tls
    data: dict[str, Any] = {"device_id": dev, "scopes": scopes, "mqtt": mqtt,
                            "data_dir": layout.data_dir.format(dev=dev)}
    if config.schema_file is not None:
        data["schema_file"] = layout.path(layout.schema_name.format(dev=dev))
    try:
        return AgentConfig.model_validate(data)
    except ValueError as exc:
        raise InvalidArgument(f"cannot build an agent config for {dev}: {exc}") from None


def _write_credentials(env: Mapping[str, str], dev: str, password: str,
                       password_file: Path | None = None, *,
                       where: str = "in the agent config") -> str:
    try:
        from broker.embedded import passwords
    except ImportError:  # pragma: no cover - the module ships with the broker
        return "broker credentials: not written (broker.embedded.passwords is not available)"
    path = password_file if password_file is not None else _password_file(env)
    passwords.write_password_entry(path, dev, password)
    return (f"broker credentials: user {dev} added to {path}; the password is {where} "
            "(Mosquitto reloads the file on SIGHUP)")


def _revoke_credentials(env: Mapping[str, str], dev: str,
                        password_file: Path | None = None) -> str:
    try:
        from broker.embedded import passwords
    except ImportError:  # pragma: no cover - the module ships with the broker
        return ""
    path = password_file if password_file is not None else _password_file(env)
    if passwords.delete_password_entry(path, dev):
        return f"; its broker login was removed from {path}"
    return ""


def cmd_device_list(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`waystation device list`: registered devices and their scopes."""
    store = open_store(_config(args, env))
    try:
        devices = registry.list_devices(store)
    finally:
        store.close()
    if args.json:
        _print_json([devstate.device_doc(d) for d in devices])
        return 0
    if not devices:
        print("no devices registered (add one with `waystation device add ID --scope S`)")
        return 0
    _table(["DEVICE", "SCOPES", "STATE", "CREATED"],
           [[d.id, ",".join(d.scopes), devstate.lifecycle(d), _iso(d.created_ms)]
            for d in devices])
    return 0


def cmd_device_remove(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`waystation device remove ID`: revoke a device (its records stay)."""
    config = _config(args, env)
    store = open_store(config)
    try:
        registry.remove_device(store, args.device_id)
    finally:
        store.close()
    note = _revoke_credentials(env, args.device_id, config.enrol.password_file)
    print(f"device {args.device_id} removed: its changes are refused from now on{note}")
    return 0


def _issue(args: argparse.Namespace, env: Mapping[str, str], cmd: str, what: str) -> int:
    store = open_store(_config(args, env))
    try:
        row = registry.issue_command(store, args.device_id, cmd, _now_ms())
    finally:
        store.close()
    print(f"{cmd} queued for {args.device_id} (command {row.id}): {what}; it is sent at once "
          "if the device is online, else when it next connects")
    return 0


def cmd_device_wipe(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`waystation device wipe ID`: order a device to erase its local data."""
    return _issue(args, env, "wipe",
                  "the device is disabled now and erases its local data (its key first) "
                  "before anything else reaches it; it gets no data again until "
                  f"`waystation device enable {args.device_id}`; `device list` shows when "
                  "the wipe is done")


def cmd_device_resync(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`waystation device resync ID`: order a device to catch up from zero."""
    return _issue(args, env, "resync", "the device will rebuild its data from the server")


def cmd_device_sync(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`waystation device sync ID`: order a device to sync now, whatever its policy."""
    return _issue(args, env, "sync", "the device sends what it holds back now (sync windows, "
                  "metered link, battery), for its policy.sync_now_s")


def _set_enabled(args: argparse.Namespace, env: Mapping[str, str], enabled: bool) -> int:
    store = open_store(_config(args, env))
    try:
        registry.set_enabled(store, args.device_id, enabled)
    finally:
        store.close()
    state = "enabled: its changes are accepted" if enabled else \
        ("disabled: it gets no data and its changes wait on the device until "
         f"`waystation device enable {args.device_id}`")
    print(f"device {args.device_id} {state}")
    return 0


def cmd_device_disable(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`waystation device disable ID`."""
    return _set_enabled(args, env, False)


def cmd_device_enable(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`waystation device enable ID`."""
    return _set_enabled(args, env, True)


__all__ = [
    "cmd_broker_run",
    "cmd_device_add",
    "cmd_device_disable",
    "cmd_device_enable",
    "cmd_device_list",
    "cmd_device_remove",
    "cmd_device_resync",
    "cmd_device_sync",
    "cmd_device_wipe",
    "cmd_server_conflicts",
    "cmd_server_deadletters",
    "cmd_server_devices",
    "cmd_server_resolve",
    "cmd_server_run",
    "cmd_server_status",
]
