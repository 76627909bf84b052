"""The example production configs in deploy/config load with the real config models."""

from __future__ import annotations

from pathlib import Path

from waystation.config import AgentConfig, ServerConfig, load_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "config"


def test_server_example_loads_with_postgres_shared_group_and_enrol() -> None:
    """deploy/config/server.toml is a valid server config for a Mosquitto + PostgreSQL fleet."""
    cfg = load_config(ServerConfig, DEPLOY / "server.toml", {"CREDENTIALS_DIRECTORY": "/run/c"})
    assert cfg.store.kind == "postgres" and cfg.shared_group == "waystation"
    # Step 4 of the guide sets up peer authentication on the local socket: the example
    # must connect that way (a TCP URL without a password is refused by Debian's
    # pg_hba.conf, which asks TCP clients for a password).
    assert cfg.store.url == "postgresql:///waystation?host=/var/run/postgresql"
    assert cfg.enrol.broker_port == 8883 and cfg.enrol.ca_file is not None
    assert cfg.log.format == "json"


def test_agent_example_loads_with_tls() -> None:
    """deploy/config/agent.toml is a valid agent config connecting over TLS."""
    cfg = load_config(AgentConfig, DEPLOY / "agent.toml", {"CREDENTIALS_DIRECTORY": "/run/c"})
    assert cfg.mqtt.tls is not None and cfg.mqtt.port == 8883
    assert cfg.scopes == ["route-42", "depot-7", "fleet"]
