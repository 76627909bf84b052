"""Server inspection: `waystation server status` and `waystation server devices`."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from broker.cli.common import live_schema, now_ms, open_existing_store, server_config
from broker.server import devstate, liveness, login_removal
from broker.server.process_identity import ended_servers
from broker.server.store.base import DeadLetterStats, DeviceRow, ServerRow
from waystation.cli.output import ago, iso, print_json, table


def cmd_server_status(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`waystation server status`: store, schema, devices, sequences, conflicts."""
    config = server_config(args, env)
    store = open_existing_store(config)
    try:
        live = live_schema(config, store)
        catalog, file_version = live.catalog, live.file.version
        info = store.info()
        with store.read() as txn:
            devices = txn.devices()
            seqs = txn.scope_seqs()
            horizons = {s: txn.purge_horizon(s) for s in seqs}
            letters = txn.dead_letter_stats()
            removals = [login_removal.removal_doc(r) for r in login_removal.pending(txn)]
            servers = txn.servers()
    finally:
        store.close()
    now = now_ms()
    stale_ms = _stale_s(args) * 1000
    ended = ended_servers(servers)
    running = liveness.any_running(servers, now, stale_ms, ended)
    serving = liveness.any_serving(servers, now, stale_ms, ended)
    online = sorted(d.id for d in devices if d.online)
    never = sorted(d.id for d in devices if not d.online and not d.last_seen_ms)
    refused = {d.id: d.dl for d in devices if d.dl > 0}
    clocks = {d.id: d for d in devices if d.clk}
    rotating = {d.id: rot for d in devices
                if (rot := devstate.rotation_doc(d)) is not None and rot["stage"] != "retired"}
    renewing = {d.id: crt["renewal"] for d in devices
                if (crt := devstate.cert_doc(d)) is not None and crt["renewal"] is not None
                and crt["renewal"]["stage"] != "in use"}
    doc: dict[str, Any] = {
        "server_id": config.server_id,
        "server_running": running,
        "server_connected": serving,
        "presence_as_of": None if serving else iso(liveness.presence_as_of(servers)) or None,
        "stale_after_s": _stale_s(args),
        "servers": [liveness.server_doc(r, now, stale_ms, ended) for r in servers],
        "store": {"kind": info.kind, "location": info.location, "size_bytes": info.size_bytes,
                  "capacity_bytes": info.capacity_bytes,
                  "encrypted": bool(getattr(store, "encrypted", False))},
        "schema": {"file": str(config.schema_path()), "version": catalog.version,
                   "file_version": file_version},
        "devices": {"known": len(devices), "enabled": sum(d.enabled for d in devices),
                    "online": len(online), "never_connected": len(never),
                    "with_dead_letters": refused,
                    "clock_off": {dev: {"offset_ms": d.clk, "measured": iso(d.clk_ms),
                                        "note": devstate.clock(d, now)}
                                  for dev, d in sorted(clocks.items())}},
        "scopes": {s: {"seq": q, "purged_to": horizons[s]} for s, q in sorted(seqs.items())},
        "records": info.counts["records"],
        "open_conflicts": info.counts["open_conflicts"],
        "conflicts": info.counts["conflicts"],
        "dead_letters": info.counts["dead_letters"],
        "dead_letter_store": {**letters.to_json(), "oldest": iso(letters.oldest_ms),
                              "max_count": config.dead_letters.max_count,
                              "max_bytes": config.dead_letters.max_bytes,
                              "max_age_s": config.dead_letters.max_age_s},
        "pending_notices": info.counts["notices"],
        "password_rotations": rotating,
        "cert_renewals": renewing,
        "login_removals": {r["device"]: {
            "queued": iso(r["queued_ms"]),
            "failing": None if not r["failing"] else {
                "at": iso(r["failing"]["at_ms"]), "error": r["failing"]["error"],
                "hint": r["failing"]["hint"]}} for r in removals},
    }
    if args.json:
        print_json(doc)
        return 0
    size = f"{info.size_bytes / 1048576:.1f} MiB used"
    if info.capacity_bytes:
        size += f" of {info.capacity_bytes / 1048576:.0f} MiB"
    sealed = ", encrypted at rest" if doc["store"]["encrypted"] else ""
    print(f"server {config.server_id}: {info.kind} store at {info.location}, {size}{sealed}")
    _print_servers(servers, now, stale_ms, _stale_s(args), ended, _config(args),
                   config.server_id)
    if file_version == catalog.version:
        print(f"schema version {catalog.version} ({config.schema_path()})")
    else:
        # After a publish the file lags until the operator copies the new version over
        # it (deploy/README.md, "Changing the schema", step 4).
        print(f"schema version {catalog.version} (published; the schema file "
              f"{config.schema_path()} is version {file_version})")
    print(f"devices: {len(devices)} known, {doc['devices']['enabled']} enabled, "
          f"{len(online)} online" + (f" ({', '.join(online[:10])}"
                                     f"{', ...' if len(online) > 10 else ''})" if online else "")
          + ("" if serving else " as the last server left them, not live")
          + (f"; {len(never)} never connected ({', '.join(never[:10])}"
             f"{', ...' if len(never) > 10 else ''}): `waystation agent status` on each "
             "says why (not started, wrong broker address or login)" if never else ""))
    print(f"records: {doc['records']}; open conflicts: {doc['open_conflicts']} "
          f"(of {doc['conflicts']} logged); dead letters: {doc['dead_letters']}")
    print(_letters_line(letters, config.dead_letters.max_count,
                        config.dead_letters.max_bytes))
    if refused:
        names = sorted(refused, key=lambda dev: (-refused[dev], dev))
        print(f"devices holding dead letters (changes refused for good, waiting for a "
              f"person): {', '.join(f'{dev} ({refused[dev]})' for dev in names[:10])}"
              f"{', ...' if len(names) > 10 else ''}; on each, `waystation agent "
              "deadletters` lists them (retry or discard)")
    if clocks:
        print(_clocks_line(list(clocks.values()), now))
    if rotating:
        print("password rotations under way: " + ", ".join(
            f"{dev} ({rot['stage']}" + (f", next step failed at {rot['failing']['at']}: "
                                       f"{rot['failing']['error']}" if rot["failing"] else "")
            + ")" for dev, rot in sorted(rotating.items())))
    if removals:
        print("broker logins of removed devices still to delete: " + ", ".join(
            f"{r['device']} ({devstate.removal_state(r)})" for r in removals))
    if renewing:
        print("client certificate renewals under way: " + ", ".join(
            f"{dev} ({ren['stage']})" for dev, ren in sorted(renewing.items())))
    if seqs:
        print()
        table(["SCOPE", "SEQUENCE", "PURGED TO"],
               [[s, q, horizons[s] or "-"] for s, q in sorted(seqs.items())])
    return 0


def _stale_s(args: argparse.Namespace) -> int:
    stale: int | None = getattr(args, "stale_after", None)
    return liveness.STALE_AFTER_S if stale is None else stale


def _config(args: argparse.Namespace) -> str | None:
    """The --config given, for the start hint (`liveness.start_hint`)."""
    config = getattr(args, "config", None)
    return None if config is None else str(config)


def _print_servers(servers: list[ServerRow], now: int, stale_ms: int, stale_s: int,
                   ended: frozenset[str], config: str | None = None,
                   own_id: str | None = None) -> None:
    """Which merge servers run, and plainly when none serves (`broker.server.liveness`)."""
    for row in servers:
        print(liveness.describe(row, now, stale_ms, ended, config, own_id))
    warning = liveness.presence_warning(servers, now, stale_s, ended, config)
    if warning:
        print(warning)


def _letters_line(st: DeadLetterStats, max_count: int, max_bytes: int) -> str:
    """What the dead letters hold against their bounds, and what the bounds dropped."""
    line = (f"dead letters kept: {st.count} of at most {max_count}, "
            f"{st.bytes / 1048576:.1f} of {max_bytes / 1048576:.0f} MiB")
    if st.count:
        line += f", oldest {iso(st.oldest_ms)}"
    if st.truncated:
        line += f"; {st.truncated} with their raw payload cut"
    line += (f"; dropped by the bounds: {st.dropped} ({st.dropped_bytes / 1048576:.1f} MiB)"
             if st.dropped else "; none dropped by the bounds")
    return line


def _clocks_line(devices: list[DeviceRow], now: int) -> str:
    """The devices whose clock is off, furthest first, and what to do."""
    devices.sort(key=lambda d: (-abs(d.clk), d.id))
    names = ", ".join(f"{d.id} {devstate.clock(d, now).removeprefix('clock ')}"
                      for d in devices[:10])
    return (f"devices whose clock is off (behind: their changes lose last-writer-wins to "
            f"writes older in reality; ahead: re-stamped or refused): {names}"
            f"{', ...' if len(devices) > 10 else ''}; fix the device's time sync (NTP)")


def cmd_server_devices(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`waystation server devices`: devices with scopes, presence and progress."""
    store = open_existing_store(server_config(args, env))
    try:
        with store.read() as txn:
            devices = txn.devices()
            seqs = txn.scope_seqs()
            servers = txn.servers()
    finally:
        store.close()
    now = now_ms()
    stale_s = _stale_s(args)
    # With no server running, presence is as the last one left it: say so, per device
    # (`presence_as_of` in JSON; "online?" in the table) and once above the table.
    warning = liveness.presence_warning(servers, now, stale_s, ended_servers(servers),
                                        _config(args))
    as_of = None if warning is None else liveness.presence_as_of(servers)
    if args.json:
        print_json([{**devstate.device_doc(d, seqs),
                     "presence_as_of": None if as_of is None else iso(as_of) or "unknown"}
                    for d in devices])
        return 0
    if not devices:
        print("no devices registered (add one with `waystation device add ID --scope S`)")
        return 0
    if warning is not None:
        print(warning)
    rows = []
    for d in devices:
        rows.append([d.id, devstate.presence(d, as_of, now), ago(d.last_seen_ms, now),
                     ago(d.synced_ms, now), d.agent or "-", devstate.pending(d, now),
                     devstate.dead_letters(d), devstate.progress(d, seqs, now)])
    table(["DEVICE", "STATE", "LAST SEEN", "LAST SYNC", "AGENT", "PENDING",
           "DEAD LETTERS", "REPORTED CHECKPOINT / SEQ"], rows)
    return 0


__all__ = ["cmd_server_devices", "cmd_server_status"]
