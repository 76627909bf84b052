"""`waystation device renew-cert ID`: a new client certificate with no lockout."""

from __future__ import annotations

import argparse
from collections.abc import Mapping

from broker.cli.common import now_ms, open_existing_store, server_config
from broker.embedded.certs import issue_client_cert
from broker.errors import InvalidArgument
from broker.server import cert_issue
from waystation.cli.output import iso, print_json


def cmd_device_renew_cert(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """Order a renewal: a device that speaks capability cert_renew makes a new key, the
    server signs its request and the device switches to the new certificate (the old
    one stays valid until it expires). For an older agent, say how to do it by hand;
    with --out, write the new files for it like `device add` does."""
    config = server_config(args, env)
    enrol = config.enrol
    if enrol.client_ca_cert is None or enrol.client_ca_key is None:
        raise InvalidArgument("this server issues no client certificates: set "
                              "enrol.client_ca_cert and enrol.client_ca_key (the CA the "
                              "broker trusts for device certificates) in its config")
    days = args.days if args.days is not None else enrol.client_cert_days
    store = open_existing_store(config)
    try:
        state, cmd, row = cert_issue.order(store, args.device_id, args.days, now_ms())
    finally:
        store.close()
    speaks = cert_issue.CAP in row.caps
    written = None
    if args.out is not None:
        written = issue_client_cert(enrol.client_ca_cert, enrol.client_ca_key,
                                    args.device_id, args.out, days=days)
    if args.json:
        print_json({"device": args.device_id, "renewal": state.id, "command": cmd.id,
                    "stage": state.stage, "days": days, "device_speaks_cert_renew": speaks,
                    "files": None if written is None else {
                        "cert": str(written.cert_path), "key": str(written.key_path)},
                    "current_cert_expires": iso(state.exp) or None})
        return 0
    print(f"certificate renewal {state.id} ordered for {args.device_id} ({days} days)")
    if speaks:
        print(f"command {cmd.id} asks the device to make a new key and send a signing "
              "request (at once if it is online, else when it next connects); the server "
              "signs it and the device connects with the new certificate. Its current "
              "certificate stays valid until it expires"
              + (f" ({iso(state.exp)})" if state.exp else ""))
    else:
        print(f"note: {args.device_id} has not said it understands certificate renewal (an "
              "agent older than this server, or it has not connected since the upgrade): "
              "the command waits for it. By hand: issue new files with "
              f"`waystation device renew-cert {args.device_id} --out DIR`, copy DIR/"
              f"{args.device_id}.crt and .key to the device (mqtt.tls cert_file / key_file; "
              "the key mode 0600) and restart its agent")
    if written is not None:
        print(f"wrote {written.cert_path} and {written.key_path} (key mode 0600): copy both "
              "to the device; its old certificate stays valid until it expires")
    print("progress: `waystation device list`")
    return 0


__all__ = ["cmd_device_renew_cert"]
