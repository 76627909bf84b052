"""Config models: defaults, and every kind of wrong input is refused with its key named."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas.collection import example_catalog_path
from schemas.wire import ID_PATTERN as WIRE_ID_PATTERN
from waystation.config import (
    ID_PATTERN,
    AgentConfig,
    BrokerConfig,
    MqttConfig,
    ServerConfig,
    default_device_id,
    load_config,
)
from waystation.errors import ConfigError


def load_text(tmp_path: Path, model: type, text: str, name: str = "part.toml") -> object:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return load_config(model, path, {})


def test_agent_defaults_without_file() -> None:
    """With no file and no environment, the agent config is the documented defaults."""
    cfg = load_config(AgentConfig, None, {})
    assert cfg.device_id.startswith("dev-")
    assert cfg.data_dir == Path("waystation-data/agent")
    assert cfg.scopes == ["default"]
    assert cfg.schema_path() == example_catalog_path()
    assert (cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.prefix) == ("127.0.0.1", 1883, "waystation")
    assert cfg.mqtt.keepalive_s == 30 and cfg.mqtt.tls is None
    assert cfg.sync.batch_max_changes == 500 and cfg.sync.compress_over_bytes == 512
    assert cfg.sync.poll_interval_s == 0.1 and cfg.sync.catchup_page == 1000
    assert cfg.sync.acked_journal_days == 7 and cfg.sync.acked_journal_max_mb == 32
    assert cfg.storage.map_size_mb == 64 and cfg.storage.encryption_key_file is None
    assert (cfg.log.level, cfg.log.format) == ("info", "console")
    assert cfg.mqtt_username() == cfg.device_id


def test_server_defaults_without_file() -> None:
    """The server defaults: lmdb store, no shared group, server user name, no metrics port."""
    cfg = load_config(ServerConfig, None, {})
    assert cfg.server_id == "server-1"
    assert cfg.store.kind == "lmdb" and cfg.store.url is None
    assert cfg.mqtt.username == "waystation-server"
    assert cfg.shared_group is None
    assert cfg.enrol.broker_host is None and cfg.enrol.ca_file is None
    assert cfg.merge.max_skew_ms == 300_000 and cfg.merge.skew_policy == "restamp"
    assert cfg.merge.tombstone_retention_s == 30 * 24 * 3600
    assert cfg.metrics_port is None


def test_broker_defaults_without_file() -> None:
    """The broker defaults: local listener, no TLS, password file inside data_dir."""
    cfg = load_config(BrokerConfig, None, {})
    assert (cfg.host, cfg.port, cfg.tls_port, cfg.tls) == ("127.0.0.1", 1883, None, None)
    assert cfg.resolved_password_file() == Path("waystation-data/broker/passwd")
    assert cfg.server_users == ["waystation-server"] and cfg.allow_anonymous is False


def test_server_mqtt_table_keeps_server_username(tmp_path: Path) -> None:
    """An [mqtt] table in the server config without username still logs in as the server."""
    cfg = load_text(tmp_path, ServerConfig, '[mqtt]\nhost = "broker.example"\n')
    assert isinstance(cfg, ServerConfig)
    assert cfg.mqtt.username == "waystation-server" and cfg.mqtt.host == "broker.example"


def test_models_are_frozen() -> None:
    """A loaded config cannot be changed by accident."""
    cfg = load_config(AgentConfig, None, {})
    with pytest.raises(ValueError):
        cfg.device_id = "other"  # type: ignore[misc]


def test_id_pattern_matches_wire_protocol() -> None:
    """The config's id pattern is the protocol's (PROTOCOL.md §2)."""
    assert ID_PATTERN == WIRE_ID_PATTERN


@pytest.mark.parametrize(
    ("hostname", "expected"),
    [
        ("van12", "dev-van12"),
        ("Van 12.fleet.example.com", "dev-Van-12"),
        ("", "dev-unknown"),
        ("___", "dev-unknown"),
        ("x" * 100, "dev-" + "x" * 60),
    ],
)
def test_default_device_id_is_sanitised(hostname: str, expected: str) -> None:
    """The default device id is dev-<hostname>, cleaned up to a valid id."""
    assert default_device_id(hostname) == expected


BAD_INPUTS = [
    # (model, TOML, key that must be named, words that must appear)
    (AgentConfig, 'device_id = "van 12"', "device_id", "not a valid device id"),
    (AgentConfig, 'device_id = "-van"', "device_id", "not a valid device id"),
    (AgentConfig, 'device_id = 12', "device_id", "valid string"),
    (AgentConfig, "scopes = []", "scopes", "at least 1"),
    (AgentConfig, 'scopes = ["a", "b c"]', "scopes.1", "not a valid scope id"),
    (AgentConfig, 'scopes = ["a", "a"]', "scopes", "listed twice"),
    (AgentConfig, 'scopes = "a"', "scopes", "valid list"),
    (AgentConfig, "[mqtt]\nport = 70000", "mqtt.port", "a whole number from 1 to 65535"),
    (AgentConfig, "[mqtt]\nport = 0", "mqtt.port", "a whole number from 1 to 65535"),
    (AgentConfig, '[mqtt]\nport = "1883"', "mqtt.port", "a whole number from 1 to 65535"),
    (AgentConfig, "[mqtt]\nport = true", "mqtt.port", "a whole number from 1 to 65535"),
    (AgentConfig, "[mqtt]\nport = 1883.5", "mqtt.port", "a whole number from 1 to 65535"),
    (AgentConfig, '[mqtt]\nprefix = "a/b"', "mqtt.prefix", "topic level"),
    (AgentConfig, '[mqtt]\nprefix = "fleet+"', "mqtt.prefix", "topic level"),
    (AgentConfig, '[mqtt]\nprefix = "$SYS"', "mqtt.prefix", "'$'"),
    (AgentConfig, '[mqtt]\nprefix = ""', "mqtt.prefix", "empty"),
    (AgentConfig, "[mqtt]\nkeepalive_s = 1", "mqtt.keepalive_s",
     "a whole number of seconds from 5 to 600 (got 1)"),
    (AgentConfig, "[mqtt]\nprot = 1884", "mqtt.prot", "did you mean 'port'"),
    (AgentConfig, '[mqtt]\npassword = "s3cret"\npassword_file = "/run/pw"',
     "mqtt.password_file", "together with password"),
    (AgentConfig, '[mqtt.tls]\ncert_file = "/c.pem"', "mqtt.tls", "cert_file and key_file"),
    (AgentConfig, "[mqtt.tls]\ninsecure = 1", "mqtt.tls.insecure", "valid boolean"),
    (AgentConfig, "[sync]\nbatch_max_changes = 1001", "sync.batch_max_changes", "1000"),
    (AgentConfig, "[sync]\nack_timeout_s = 0", "sync.ack_timeout_s", "greater than 0"),
    (AgentConfig, "[sync]\nbackoff_initial_s = 5.0\nbackoff_max_s = 1.0", "sync",
     "backoff_max_s"),
    (AgentConfig, "[sync]\ncatchup_page = 5001", "sync.catchup_page", "5000"),
    (AgentConfig, "[sync]\ncompress_over_bytes = -1", "sync.compress_over_bytes",
     "greater than or equal to 0"),
    (AgentConfig, "[storage]\nmap_size_mb = 100\nmax_map_size_mb = 10", "storage",
     "max_map_size_mb"),
    (AgentConfig, '[log]\nlevel = "loud"', "log.level", "'debug', 'info', 'warning' or 'error'"),
    (AgentConfig, '[log]\nformat = "xml"', "log.format", "'console' or 'json'"),
    (AgentConfig, "colour = true", "colour", "unknown key"),
    (AgentConfig, "[storge]\nmap_size_mb = 1", "storge", "did you mean 'storage'"),
    (ServerConfig, '[store]\nkind = "postgres"', "store.url", "required when kind = 'postgres'"),
    (ServerConfig, '[store]\nkind = "postgres"\nurl = "mysql://db/x"', "store.url",
     "postgresql://"),
    (ServerConfig, '[store]\nkind = "sqlite"', "store.kind", "'lmdb' or 'postgres'"),
    (ServerConfig, "[store]\nreconnect_s = 0", "store.reconnect_s", "greater than 0"),
    (ServerConfig, '[store]\nreconnect_s = "soon"', "store.reconnect_s",
     "a number of seconds greater than 0 and at most 3600"),
    (ServerConfig, '[merge]\nskew_policy = "ignore"', "merge.skew_policy", "'restamp'"),
    (ServerConfig, '[merge]\nrules = ["not a rule"]', "merge.rules.0", "module:function"),
    (ServerConfig, "[merge]\nmax_payload_bytes = 300000", "merge.max_payload_bytes", "262144"),
    (ServerConfig, "[merge]\nmax_batch_changes = 0", "merge.max_batch_changes", "1"),
    (ServerConfig, 'shared_group = "a/b"', "shared_group", "topic level"),
    (ServerConfig, '[amqp]\nnodes = ["mq-1"]', "amqp.nodes.0", "host:port"),
    (ServerConfig, '[amqp]\nnodes = ["mq-1:99999"]', "amqp.nodes.0", "host:port"),
    (ServerConfig, '[amqp]\nnodes = ["mq-1:5672"]\nprefetch = 0', "amqp.prefetch", "1"),
    (ServerConfig, "[amqp]\nheartbeat_s = 0", "amqp.heartbeat_s", "would go unnoticed"),
    (ServerConfig, "[amqp]\nheartbeat_s = 601", "amqp.heartbeat_s", "600"),
    (ServerConfig, 'shared_group = "g"\n[amqp]\nnodes = ["mq-1:5672"]', "",
     "exclude each other"),
    (ServerConfig, "metrics_port = 65536", "metrics_port", "65535"),
    (ServerConfig, "metrics_max_connections = 0", "metrics_max_connections", "1"),
    (ServerConfig, "metrics_timeout_s = 0", "metrics_timeout_s", "greater than 0"),
    (AgentConfig, "[api]\nmax_connections = 100", "api",
     "max_feed_clients (32) + 256 long polls + 16 = 304"),
    (AgentConfig, "[api]\nmax_connections = 10", "api",  # the real floor, not "16"
     "max_connections (10) must be at least max_feed_clients (32) + 256 long polls + 16"),
    (AgentConfig, "[api]\nidle_timeout_s = 0", "api.idle_timeout_s", "greater than 0"),
    (AgentConfig, "[api]\nbody_timeout_s = 0", "api.body_timeout_s", "greater than 0"),
    (AgentConfig, "[api]\nsend_timeout_s = 0", "api.send_timeout_s", "greater than 0"),
    (ServerConfig, 'server_id = "server one"', "server_id", "not a valid server id"),
    (BrokerConfig, "tls_port = 8883", "", "tls_port and [tls] go together"),
    (BrokerConfig, 'tls_port = 8883\n[tls]\ncert_file = "c.pem"', "tls.key_file", "required"),
    (BrokerConfig, 'tls_port = 8883\n[tls]\ncert_file = "c"\nkey_file = "k"\n'
     "require_client_cert = true", "tls", "ca_file"),
    (BrokerConfig, 'server_users = ["bad user"]', "server_users.0", "not a valid user name"),
    (BrokerConfig, 'allow_anonymous = "yes"', "allow_anonymous", "valid boolean"),
    (BrokerConfig, "port = -1", "port", "a whole number from 1 to 65535 (got -1)"),
    (AgentConfig, "[sync]\nacked_journal_days = -1", "sync.acked_journal_days",
     "a number of days from 0 to 365 (got -1)"),
    (AgentConfig, '[sync]\nacked_journal_days = "7"', "sync.acked_journal_days",
     "a number of days from 0 to 365 (got \"7\")"),
    (AgentConfig, "[sync]\nacked_journal_max_mb = 0", "sync.acked_journal_max_mb",
     "a whole number of MB from 1 to 4096 (got 0)"),
    (AgentConfig, "[sync]\nacked_journal_max_mb = 5000", "sync.acked_journal_max_mb",
     "a whole number of MB from 1 to 4096 (got 5000)"),
]


@pytest.mark.parametrize(("model", "text", "key", "words"), BAD_INPUTS)
def test_wrong_input_is_refused_naming_file_and_key(
        tmp_path: Path, model: type, text: str, key: str, words: str) -> None:
    """Each kind of wrong input is a ConfigError naming the file, the dotted key and why."""
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, model, text + "\n", name="fleet.toml")
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'fleet.toml'}: ")
    if key:
        assert f": {key}: " in message
    assert words in message


def test_every_problem_is_reported(tmp_path: Path) -> None:
    """Several mistakes in one file are all listed, so one run finds them all."""
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, AgentConfig, "[mqtt]\nport = 0\nkeepalive_s = 1\n")
    message = str(info.value)
    assert "mqtt.port" in message and "mqtt.keepalive_s" in message and "1 more" in message


def test_password_value_is_not_echoed(tmp_path: Path) -> None:
    """A wrongly typed password does not appear in the error message."""
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, AgentConfig, "[mqtt]\npassword = 123456789\n")
    assert "mqtt.password" in str(info.value) and "123456789" not in str(info.value)


def test_bad_value_is_shown(tmp_path: Path) -> None:
    """The offending value is quoted so the operator sees what was read."""
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, AgentConfig, "[mqtt]\nport = 70000\n", name="agent.toml")
    assert str(info.value).endswith(
        "agent.toml: mqtt.port: must be a whole number from 1 to 65535 (got 70000)")


def test_off_switches_accept_false(tmp_path: Path) -> None:
    """`false` switches off settings that are on by default (TOML has no null)."""
    cfg = load_text(tmp_path, ServerConfig,
                    "shared_group = false\n[merge]\ncompress_over_bytes = false\n"
                    "[mqtt]\nusername = false\n")
    assert isinstance(cfg, ServerConfig)
    assert cfg.shared_group is None and cfg.merge.compress_over_bytes is None
    assert cfg.mqtt.username is None


def test_postgres_store_with_url(tmp_path: Path) -> None:
    """kind = "postgres" with a postgresql:// URL is accepted."""
    cfg = load_text(tmp_path, ServerConfig,
                    '[store]\nkind = "postgres"\nurl = "postgres://ws@db/ws"\n')
    assert isinstance(cfg, ServerConfig) and cfg.store.url == "postgres://ws@db/ws"


def test_resolved_password_from_value() -> None:
    """resolved_password returns an inline password."""
    assert MqttConfig(password="pw").resolved_password({}) == "pw"  # type: ignore[arg-type]
    assert MqttConfig().resolved_password({}) is None


def test_resolved_password_reads_file_lazily(tmp_path: Path) -> None:
    """The password file is read when asked, so a rotated password is picked up."""
    pw = tmp_path / "pw"
    pw.write_text("first\n", encoding="utf-8")
    cfg = MqttConfig(password_file=pw)
    assert cfg.resolved_password({}) == "first"
    pw.write_text("second", encoding="utf-8")
    assert cfg.resolved_password({}) == "second"


def test_resolved_password_missing_or_empty_file(tmp_path: Path) -> None:
    """A missing or empty password file is a ConfigError naming the key and the file."""
    cfg = MqttConfig(password_file=tmp_path / "absent")
    with pytest.raises(ConfigError, match=r"mqtt\.password_file: cannot read .*absent"):
        cfg.resolved_password({})
    (tmp_path / "empty").write_text("", encoding="utf-8")
    with pytest.raises(ConfigError, match="is empty"):
        MqttConfig(password_file=tmp_path / "empty").resolved_password({})


def test_credentials_directory_expansion(tmp_path: Path) -> None:
    """${CREDENTIALS_DIRECTORY} in password_file is expanded from the environment on read."""
    (tmp_path / "mqtt-password").write_text("from-systemd\n", encoding="utf-8")
    conf = tmp_path / "agent.toml"
    conf.write_text('[mqtt]\npassword_file = "${CREDENTIALS_DIRECTORY}/mqtt-password"\n',
                    encoding="utf-8")
    cfg = load_config(AgentConfig, conf, {})  # loads outside the service, too
    assert str(cfg.mqtt.password_file) == "${CREDENTIALS_DIRECTORY}/mqtt-password"
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    assert cfg.mqtt.resolved_password(env) == "from-systemd"
    loaded_inside = load_config(AgentConfig, conf, env)
    assert loaded_inside.mqtt.password_file == tmp_path / "mqtt-password"
    with pytest.raises(ConfigError, match=r"CREDENTIALS_DIRECTORY.*LoadCredential"):
        cfg.mqtt.resolved_password({})


def test_agent_api_tcp_host_must_be_loopback() -> None:
    """The local API refuses to listen anywhere but loopback, naming the key."""
    from waystation.config import AgentConfig

    assert AgentConfig.model_validate({"api": {"tcp_port": 8080}}).api.tcp_host == "127.0.0.1"
    with pytest.raises(ValueError, match="not a loopback address"):
        AgentConfig.model_validate({"api": {"tcp_port": 8080, "tcp_host": "0.0.0.0"}})


def test_a_raised_max_feed_clients_raises_the_default_max_connections(tmp_path: Path) -> None:
    """A config from before api.max_connections existed, with max_feed_clients raised past
    what the default leaves room for, still loads (an upgrade must not stop the agent): the
    unset limit makes room for the feeds and long polls; one the operator set too low is
    refused (the BAD_INPUTS row)."""
    cfg = load_text(tmp_path, AgentConfig, "[api]\nmax_feed_clients = 1000\n")
    assert isinstance(cfg, AgentConfig)
    assert cfg.api.max_connections == 1000 + 256 + 16
    default = load_text(tmp_path, AgentConfig, "[api]\nmax_feed_clients = 32\n")
    assert isinstance(default, AgentConfig) and default.api.max_connections == 512
