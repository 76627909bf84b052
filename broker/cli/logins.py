"""Broker logins: `waystation broker passwd`, and the password-file entries that
`device add` / `device remove` write and revoke."""

from __future__ import annotations

import argparse
import secrets
import sys
from collections.abc import Mapping
from pathlib import Path

from broker.errors import InvalidArgument
from waystation.cli.output import print_json
from waystation.config import BrokerConfig, load_config


def cmd_broker_passwd(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`waystation broker passwd USER`: add or change a login in the password file."""
    from broker.embedded.passwords import write_password_entry

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
    if getattr(args, "json", False):
        print_json({"user": user, "password_file": str(path),
                    "password": password if generated else None})
        return 0
    print(f"login {user} written to {path} (Mosquitto reloads it on SIGHUP; the embedded "
          "broker picks it up at the next connection)")
    if generated:
        print(f"password: {password}")
    return 0


def default_password_file(env: Mapping[str, str]) -> Path:
    """The broker's password file (from the broker config's environment overrides)."""
    return load_config(BrokerConfig, None, env).resolved_password_file()


def write_credentials(env: Mapping[str, str], dev: str, password: str,
                       password_file: Path | None = None, *,
                       where: str = "in the agent config") -> str:
    try:
        from broker.embedded import passwords
    except ImportError:  # pragma: no cover - the module ships with the broker
        return "broker credentials: not written (broker.embedded.passwords is not available)"
    path = password_file if password_file is not None else default_password_file(env)
    passwords.write_password_entry(path, dev, password)
    return (f"broker credentials: user {dev} added to {path}; the password is {where} "
            "(Mosquitto reloads the file on SIGHUP, e.g. `systemctl reload mosquitto`; the "
            "embedded broker picks it up at the next connection)")


def revoke_credentials(env: Mapping[str, str], dev: str,
                        password_file: Path | None = None) -> str:
    try:
        from broker.embedded import passwords
    except ImportError:  # pragma: no cover - the module ships with the broker
        return ""
    path = password_file if password_file is not None else default_password_file(env)
    # A password under rotation must not outlive the device's login.
    passwords.drop_overlap(path, dev)
    if passwords.delete_password_entry(path, dev):
        # Neither broker drops a connection the device holds when the file changes:
        # Mosquitto does at its reload; the embedded broker keeps it, but the server
        # refuses the device from now on and sends it nothing.
        return (f"; its broker login was removed from {path} (Mosquitto: reload it, e.g. "
                "`systemctl reload mosquitto`, to also drop a connection the device holds)")
    return ""


__all__ = ["cmd_broker_passwd", "default_password_file", "revoke_credentials",
           "write_credentials"]
