"""Enrolment: `waystation device add` registers a device, gives it a broker login and
writes the agent config (portable or systemd layout) to copy onto it."""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.cli.common import now_ms, server_config
from broker.cli.logins import write_credentials
from broker.errors import InvalidArgument
from broker.server import registry
from broker.server.store import open_store
from waystation.cli.output import print_json
from waystation.config import AgentConfig, ServerConfig, dump_toml


def cmd_device_add(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`waystation device add ID --scope S ... [--out DIR]`: enrol a device."""
    config = server_config(args, env)
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
        row = registry.add_device(store, dev, scopes, now_ms())
    finally:
        store.close()
    where = "in " + f"{dev}.mqtt-password" if layout.password_file else "in the agent config"
    if enrol.broker_kind == "rabbitmq":
        # RabbitMQ keeps its own users: the operator imports them (deploy/README.md).
        pw_note = (f"broker credentials: the password is {where}; RabbitMQ gets the user "
                   "from `python -m broker.rabbitmq.definitions --server-config ...` and "
                   "`rabbitmqctl import_definitions` (no password file written)")
    else:
        pw_note = write_credentials(env, dev, password, enrol.password_file, where=where)
    out_dir.mkdir(parents=True, exist_ok=True)
    if enrol.ca_file is not None:
        shutil.copyfile(enrol.ca_file, out_dir / "ca.pem")
    if layout.password_file is not None:
        _write_private(out_dir / f"{dev}.mqtt-password", password + "\n")
    issued = None
    if enrol.client_ca_cert is not None and enrol.client_ca_key is not None:
        from broker.embedded.certs import issue_client_cert

        issued = issue_client_cert(enrol.client_ca_cert, enrol.client_ca_key, dev, out_dir,
                                   days=enrol.client_cert_days)
        pw_note += f"; client certificate {issued.cert_path} (key {issued.key_path})"
    if config.schema_file is not None:
        shutil.copyfile(config.schema_path(), out_dir / layout.schema_name.format(dev=dev))
    header = layout.header(dev, client_cert=issued is not None)
    text = dump_toml(agent, mask_secrets=False, exclude_defaults=True, header=header)
    _write_private(agent_file, text, exclusive=True)
    if getattr(args, "json", False):
        print_json({"device": dev, "scopes": list(row.scopes), "agent_config": str(agent_file),
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

    def header(self, dev: str, *, client_cert: bool = False) -> str:
        if self.password_file is None:
            return (f"Waystation agent config for device {dev} (written by `waystation device "
                    "add`).\nCopy it (with the files next to it) to the device and run "
                    "`waystation agent run --config FILE`.\nIt holds the device's broker "
                    "password: keep it private (mode 0600).")
        return (f"Waystation agent config for device {dev} (written by `waystation device add "
                f"--systemd`).\nInstall as /etc/waystation/agent-{dev}.toml; ca.pem and the "
                "schema into /etc/waystation/,\n"
                # The config names them (mqtt.tls): an agent without them cannot log in.
                + (f"{dev}.crt and {dev}.key (the key mode 0640, group waystation) into "
                   "/etc/waystation/,\n" if client_cert else "")
                + "the .mqtt-password file as "
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


__all__ = ["PORTABLE_LAYOUT", "SYSTEMD_LAYOUT", "AgentLayout", "cmd_device_add"]
