"""Parser group of the merge server: `waystation server ...`."""

from __future__ import annotations

import argparse
from pathlib import Path

from waystation.cli.argtypes import int_between, parse_value, positive_int, server_id
from waystation.cli.builder import Builder, json_flag

MAX_STALE_AFTER_S = 366 * 86_400
"""The most `--stale-after` takes: a server not seen for over a year is gone, whatever
else the operator meant (a typo with more digits gets an error, not a server that
counts as running for ever)."""


def _stale_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stale-after", metavar="SECONDS",
                   type=int_between(1, MAX_STALE_AFTER_S, "seconds"), default=None,
                   help="count a merge server not seen for this long (and not stopped "
                        "cleanly) as gone (default 30, at most 31622400: a year; a running "
                        "server records itself every 5 s)")


def add_server(b: Builder) -> None:
    b.group("server", "the merge server: run it and inspect the fleet's data",
            "Commands of the merge server: `run` consumes every device's changes, merges "
            "them and answers with acks and deltas; the others inspect the authoritative "
            "store and let an operator settle conflicts.")
    b.leaf("server run", "run the merge server (foreground, systemd-friendly)",
           "Run the merge server in the foreground: connect to the broker, consume every "
           "device's changes, merge them into the store, ack each device and send the "
           "result to the devices that share the scope, until stopped (SIGTERM: exit 0; "
           "Ctrl-C: exit 130). With no mqtt password configured it logs in with the one "
           "`waystation broker run` generated in the broker's data_dir (server-password), "
           "so both run on one machine with no config files. A busy metrics_port stops "
           "it before it connects (exit 4).", config="server")
    p = b.leaf("server status", "show the server's state and counters",
               "Show the server's state: the merge servers recorded in the store (running, "
               "stopped cleanly, or gone: crashed or cut off from the store), the store in "
               "use, schema version, scopes and their sequences, devices known and online, "
               "and open conflicts. With no merge server running it says so: device "
               "presence is then as the last server left it.", config="server")
    json_flag(p)
    _stale_flag(p)
    p = b.leaf("server devices", "list devices, their scopes and last contact",
               "List every device the server knows, with its scopes, whether it is online, "
               "when it last synced and how far it has caught up. With no merge server "
               "running, an online device shows as `online? (as of T)`: nobody has kept its "
               "presence since T.", config="server")
    json_flag(p)
    _stale_flag(p)
    p = b.leaf("server forget", "drop a retired merge server from `server status`",
               "Forget merge server SERVER_ID: its liveness row goes, so `server status` no "
               "longer lists a server that will not run again (a retired host, a renamed "
               "server_id). Refused while it runs; a server that runs again records itself "
               "anew.", config="server")
    p.add_argument("server_id", metavar="SERVER_ID", type=server_id,
                   help="the server's id, as `server status` lists it")
    json_flag(p)
    _stale_flag(p)
    p = b.leaf("server conflicts", "list open conflicts",
               "List the open conflicts: manual fields written concurrently by different "
               "devices, each with its candidates, waiting for `server resolve`.",
               config="server")
    json_flag(p)
    p.add_argument("--all", action="store_true",
                   help="the whole conflict log (closed entries and lww losers too)")
    p.add_argument("--limit", metavar="N", type=positive_int, default=None,
                   help="show at most N entries, newest first (default 1000)")
    p = b.leaf("server resolve", "settle a conflict with a chosen value",
               "Settle an open conflict by writing VALUE (JSON when it parses as JSON, "
               "else text) as the field's authoritative value; every device in the scope "
               "receives it.", config="server")
    p.add_argument("conflict_id", metavar="CONFLICT_ID",
                   help="the conflict's id, from `server conflicts`")
    p.add_argument("value", metavar="VALUE", type=parse_value,
                   help="the value to keep (JSON when it parses, else text)")
    json_flag(p)
    p = b.leaf("server backup", "copy the LMDB store, consistently, while it runs",
               "Write a consistent, compacted copy of the server's LMDB store into DEST, a "
               "new directory laid out as a server data directory (safe while the server "
               "runs); `server restore` puts it back. A PostgreSQL store is backed up with "
               "pg_dump.",
               config="server")
    json_flag(p)
    p.add_argument("dest", metavar="DEST", help="the backup directory (must not exist)")
    p = b.leaf("server restore", "put a store backup in place (server stopped)",
               "Copy the LMDB backup in SRC (from `server backup`) into data_dir, whose "
               "store must have been moved aside with the server stopped; or, with "
               "--in-place, take the configured store as restored by other means (a "
               "PostgreSQL database after pg_restore). Either way every scope's sequence "
               "moves forward and every device is ordered to resync at once, so each "
               "device gets a snapshot of the restored state and keeps its pending "
               "writes. What the server applied after the backup is not in it: devices "
               "give back the changes they journaled (sync.acked_journal_days) and the "
               "restored server applies them.",
               config="server")
    json_flag(p)
    p.add_argument("src", metavar="SRC", nargs="?", default=None,
                   help="a directory written by `server backup`")
    p.add_argument("--in-place", action="store_true",
                   help="the configured store was restored already: only move it on")
    _add_atrest(b)


def _add_atrest(b: Builder) -> None:
    key_help = ("the key file the store is (to be) encrypted with; default: "
                "store.encryption_key_file of the config")
    batch_help = "values rewritten per transaction (default 1000)"
    p = b.leaf("server encrypt", "encrypt the LMDB store in place (server stopped)",
               "Turn encryption at rest on for the server's LMDB store: a new random data "
               "key, wrapped with the key file, seals the records, the conflict log, the "
               "dead letters and pending notices. The server must be stopped. Safe to "
               "interrupt (even kill -9 or power loss): run it again to finish; until then "
               "the store refuses to open. Then set store.encryption_key_file and start "
               "the server. PostgreSQL: encrypt its volume instead.", config="server")
    p.add_argument("--key-file", metavar="PATH", type=Path, default=None, help=key_help)
    p.add_argument("--batch", metavar="N", type=positive_int, default=1000, help=batch_help)
    json_flag(p)
    p = b.leaf("server decrypt", "store the LMDB store's values in plain text again",
               "Turn encryption at rest off (the way back from `server encrypt`): every "
               "sealed value is rewritten in plain text and the data key destroyed. Same "
               "conditions and crash safety as `server encrypt`; then remove "
               "store.encryption_key_file from the config.", config="server")
    p.add_argument("--key-file", metavar="PATH", type=Path, default=None, help=key_help)
    p.add_argument("--batch", metavar="N", type=positive_int, default=1000, help=batch_help)
    json_flag(p)
    p = b.leaf("server rekey", "wrap the store's data key with a new key file (O(1))",
               "Change the key the LMDB store is encrypted with: its data key is re-wrapped "
               "with the new key file (a 48-byte file is rewritten, not the store). "
               "Crash-safe: the data key file is always wrapped with the old or the new "
               "key. The server must be stopped; then point store.encryption_key_file (or "
               "the systemd credential) at the new key.", config="server")
    p.add_argument("--new-key-file", metavar="PATH", type=Path, required=True,
                   help="the new key file (at least 16 bytes; use 32 random bytes)")
    p.add_argument("--key-file", metavar="PATH", type=Path, default=None, help=key_help)
    json_flag(p)
