"""dump_toml writes configs that load back equal, with secrets masked by default."""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import BaseModel, SecretStr

from waystation.config import (
    MASK,
    AgentConfig,
    BrokerConfig,
    BrokerTlsConfig,
    LogConfig,
    MergeConfig,
    MqttConfig,
    ServerConfig,
    ServerMqttConfig,
    StorageConfig,
    StoreConfig,
    SyncConfig,
    TlsConfig,
    dump_toml,
    load_config,
)


def round_trip(tmp_path: Path, config: BaseModel, **kwargs: bool) -> BaseModel:
    path = tmp_path / "out.toml"
    path.write_text(dump_toml(config, mask_secrets=False, **kwargs), encoding="utf-8")
    return load_config(type(config), path, {})


def test_defaults_round_trip(tmp_path: Path) -> None:
    """Every part's default config survives dump and load unchanged; a default data_dir
    read back from a file is relative to that file (not to the working directory)."""
    for model in (AgentConfig, ServerConfig, BrokerConfig):
        config = load_config(model, None, {})
        back = round_trip(tmp_path, config, exclude_defaults=True)
        assert back.data_dir == tmp_path / config.data_dir  # type: ignore[attr-defined]
        assert back == config.model_copy(update={"data_dir": tmp_path / config.data_dir})  # type: ignore[attr-defined]
        absolute = config.model_copy(update={"data_dir": tmp_path / "data"})
        assert round_trip(tmp_path, absolute) == absolute


def test_written_relative_paths_are_relative_to_the_written_file(tmp_path: Path) -> None:
    """A relative path written out is read back relative to the file's directory."""
    config = AgentConfig(device_id="van-1", data_dir=Path("data"))
    assert round_trip(tmp_path, config).data_dir == tmp_path / "data"  # type: ignore[attr-defined]


def test_everything_set_round_trips(tmp_path: Path) -> None:
    """A config with every setting changed, odd strings and switched-off values round-trips."""
    agent = AgentConfig(
        device_id="van-12", data_dir=Path("/var/lib/ws/agent"), scopes=["a", "b.c"],
        schema_file=Path("/etc/ws/fleet.toml"),
        mqtt=MqttConfig(host="bröker \"q\" \\ \t\x7f", port=8883, prefix="fleet",
                        username="van-12", password=SecretStr("p=\"w\"\n"), keepalive_s=60,
                        tls=TlsConfig(ca_file=Path("/ca"), cert_file=Path("/c"),
                                      key_file=Path("/k"), server_hostname="b", insecure=True),
                        connect_timeout_s=2.5),
        sync=SyncConfig(batch_max_changes=10, compress_over_bytes=None, poll_interval_s=1e-3,
                        backoff_max_s=1e6),
        storage=StorageConfig(map_size_mb=1, max_map_size_mb=2,
                              encryption_key_file=Path("${CREDENTIALS_DIRECTORY}/key")),
        log=LogConfig(level="debug", format="json"),
    )
    assert round_trip(tmp_path, agent) == agent
    server = ServerConfig(
        server_id="s2", data_dir=Path("/srv"),
        store=StoreConfig(kind="postgres", url="postgresql://u:pw@db/ws"),
        mqtt=ServerMqttConfig(username=None), shared_group=None,
        merge=MergeConfig(rules=["m.n:f"], skew_policy="reject", compress_over_bytes=None),
        metrics_port=9100)
    assert round_trip(tmp_path, server) == server
    assert round_trip(tmp_path, server, exclude_defaults=True) == server
    broker = BrokerConfig(tls_port=8883, tls=BrokerTlsConfig(
        cert_file=Path("/c"), key_file=Path("/k"), ca_file=Path("/ca"), require_client_cert=True),
        server_users=[], allow_anonymous=True, data_dir=Path("/var/lib/broker"),
        password_file=Path("/etc/passwd-mqtt"))
    assert round_trip(tmp_path, broker) == broker


def test_output_is_valid_toml_with_tables() -> None:
    """The emitted text is TOML with top-level keys first and nested tables."""
    cfg = AgentConfig(device_id="van-1", mqtt=MqttConfig(tls=TlsConfig(insecure=True)))
    text = dump_toml(cfg, header="made by a test\n\nsecond line")
    assert text.startswith("# made by a test\n#\n# second line\n")
    doc = tomllib.loads(text)
    assert doc["device_id"] == "van-1" and doc["mqtt"]["tls"]["insecure"] is True
    assert "[mqtt.tls]" in text


def test_secrets_masked_by_default() -> None:
    """Passwords and the password in a store URL are masked unless asked otherwise."""
    server = ServerConfig(store=StoreConfig(kind="postgres", url="postgresql://u:hunter2@db/ws"),
                          mqtt=ServerMqttConfig(password=SecretStr("hunter2")))
    text = dump_toml(server)
    assert "hunter2" not in text
    doc = tomllib.loads(text)
    assert doc["mqtt"]["password"] == MASK
    assert doc["store"]["url"] == f"postgresql://u:{MASK}@db/ws"
    assert "hunter2" in dump_toml(server, mask_secrets=False)


def test_exclude_defaults_writes_only_changes() -> None:
    """exclude_defaults leaves out everything at its default value."""
    text = dump_toml(AgentConfig(device_id="van-1", scopes=["depot-7"]), exclude_defaults=True)
    assert tomllib.loads(text) == {"device_id": "van-1", "scopes": ["depot-7"]}
