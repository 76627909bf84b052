"""`waystation server forget ID`: drop a retired merge server's liveness row.

A server id that will not run again (a host retired, a renamed `server_id`) would stay
in `server status` for ever as "stopped cleanly" or "not seen for N days ... crashed?".
Forgetting it is refused while the row says the server runs (it would record itself
again within seconds, and the operator most likely named the wrong one).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping

from broker.cli.common import now_ms, open_existing_store, server_config
from broker.errors import NotFound, ServerRunning
from broker.server import liveness
from broker.server.process_identity import ended_servers
from broker.server.store.base import ServerRow, WriteTxn
from waystation.cli.output import iso, print_json


def cmd_server_forget(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`waystation server forget ID`: see module docstring."""
    stale_s: int = getattr(args, "stale_after", None) or liveness.STALE_AFTER_S
    now = now_ms()
    store = open_existing_store(server_config(args, env))

    def forget(txn: WriteTxn) -> ServerRow:
        rows = txn.servers()
        row = next((r for r in rows if r.id == args.server_id), None)
        if row is None:
            known = ", ".join(r.id for r in rows) or "none"
            raise NotFound(f"no merge server {args.server_id!r} is recorded in this store "
                           f"(recorded: {known}; `waystation server status` lists them)")
        if liveness.state(row, now, stale_s * 1000, ended_servers([row])) == "running":
            raise ServerRunning(
                f"merge server {row.id} is running (seen {max(0, now - row.seen_ms) // 1000}"
                " s ago): stop it first on its host (`systemctl stop waystation-server`, or "
                "Ctrl-C / SIGTERM to a `waystation server run` in a terminal); "
                "a running server records itself again within seconds. One that crashed "
                f"counts as gone once not seen for {stale_s} s (`--stale-after SECONDS`), "
                "or at once when asked on its own host")
        txn.delete_server(row.id)
        return row

    try:
        row = store.transact(forget)
    finally:
        store.close()
    ended = ended_servers([row])
    state = liveness.state(row, now, stale_s * 1000, ended)
    if getattr(args, "json", False):
        print_json({"forgotten": liveness.server_doc(row, now, stale_s * 1000, ended)})
        return 0
    print(f"merge server {row.id} forgotten ({state}, last seen {iso(row.seen_ms)}): "
          "`server status` no longer lists it; if it runs again it records itself anew")
    return 0


__all__ = ["cmd_server_forget"]
