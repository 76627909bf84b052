"""Loading config files and environment overrides: errors name the file, line or variable."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from waystation.config import (
    AgentConfig,
    BrokerConfig,
    ServerConfig,
    env_overrides,
    load_config,
)
from waystation.errors import ConfigError


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------ the file

def test_full_agent_file_loads(tmp_path: Path) -> None:
    """A complete agent file is read into the model with every table applied."""
    conf = write(tmp_path / "agent.toml", """
device_id = "van-12"
scopes = ["route-42", "depot-7"]
[mqtt]
host = "broker.example"
port = 8883
username = "van-12"
password = "s3cret"
[mqtt.tls]
ca_file = "/etc/ssl/ca.pem"
server_hostname = "broker.example"
[sync]
batch_max_changes = 100
compress_over_bytes = false
[log]
level = "debug"
format = "json"
""")
    cfg = load_config(AgentConfig, conf, {})
    assert cfg.device_id == "van-12" and cfg.scopes == ["route-42", "depot-7"]
    assert cfg.mqtt.port == 8883 and cfg.mqtt.tls is not None
    assert cfg.mqtt.tls.ca_file == Path("/etc/ssl/ca.pem")
    assert cfg.mqtt.resolved_password({}) == "s3cret"
    assert cfg.sync.batch_max_changes == 100 and cfg.sync.compress_over_bytes is None
    assert cfg.log.format == "json"


def test_missing_file(tmp_path: Path) -> None:
    """A missing config file is a ConfigError naming the file."""
    with pytest.raises(ConfigError, match=r"nope\.toml: cannot read the config file "
                                          r"\(No such file or directory\)"):
        load_config(AgentConfig, tmp_path / "nope.toml", {})


def test_unreadable_file_directory(tmp_path: Path) -> None:
    """A path that cannot be read as a file is a ConfigError naming it."""
    with pytest.raises(ConfigError, match=r"cannot read the config file \(Is a directory\)"):
        load_config(AgentConfig, tmp_path, {})


_LOAD_AS_NOBODY = """
import os, sys
from pathlib import Path
from waystation.config import AgentConfig, load_config
from waystation.errors import ConfigError
os.seteuid(65534)  # nobody: root would read the file whatever its mode
try:
    load_config(AgentConfig, Path(sys.argv[1]), {})
except ConfigError as exc:
    print(exc)
    sys.exit(3)
"""


def _load_without_root(conf: Path) -> subprocess.CompletedProcess[str]:
    """load_config(conf) in a child that drops root (only its effective uid, after the
    imports, so it can still run this interpreter); exit code 3 with the ConfigError."""
    return subprocess.run([sys.executable, "-c", _LOAD_AS_NOBODY, str(conf)],
                          capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2])


def test_unreadable_file_permissions(tmp_path: Path) -> None:
    """A file without read permission is a ConfigError naming it (checked as an
    unprivileged user: as root the test drops to nobody in a child process)."""
    conf = write(tmp_path / "agent.toml", 'device_id = "van-1"\n')
    conf.chmod(0)
    if os.geteuid() != 0:
        with pytest.raises(ConfigError, match=r"agent\.toml: cannot read the config file"):
            load_config(AgentConfig, conf, {})
        return
    with tempfile.TemporaryDirectory(dir="/tmp") as shared:  # nobody can traverse it
        os.chmod(shared, 0o755)
        conf = write(Path(shared) / "agent.toml", 'device_id = "van-1"\n')
        conf.chmod(0o644)
        readable = _load_without_root(conf)  # control: the same child reads it when allowed
        assert readable.returncode == 0, readable.stdout + readable.stderr
        conf.chmod(0)
        refused = _load_without_root(conf)
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert re.search(r"agent\.toml: cannot read the config file \(Permission denied\)",
                     refused.stdout), refused.stdout


def test_not_utf8(tmp_path: Path) -> None:
    """A file that is not UTF-8 is a ConfigError naming file and line."""
    conf = tmp_path / "agent.toml"
    conf.write_bytes(b'device_id = "a"\nhost = "\xff"\n')
    with pytest.raises(ConfigError, match=r"agent\.toml: line 2: not UTF-8 text"):
        load_config(AgentConfig, conf, {})


def test_bad_toml_names_line(tmp_path: Path) -> None:
    """Invalid TOML is a ConfigError naming the file and the line and column."""
    conf = write(tmp_path / "agent.toml", 'device_id = "a"\n\n[mqtt]\nport 1884\n')
    with pytest.raises(ConfigError) as info:
        load_config(AgentConfig, conf, {})
    assert str(info.value).startswith(f"{conf}: line 4, column 6: invalid TOML: ")


def test_bad_toml_at_end_of_file(tmp_path: Path) -> None:
    """A TOML error at the end of the file still names a line."""
    conf = write(tmp_path / "agent.toml", 'scopes = ["a",\n')
    with pytest.raises(ConfigError, match=r"agent\.toml: line \d+ \(end of file\): invalid TOML"):
        load_config(AgentConfig, conf, {})


def test_duplicate_key_is_invalid_toml(tmp_path: Path) -> None:
    """A key given twice is refused with its line."""
    conf = write(tmp_path / "agent.toml", 'device_id = "a"\ndevice_id = "b"\n')
    with pytest.raises(ConfigError, match="line 2"):
        load_config(AgentConfig, conf, {})


# --------------------------------------------------------------------------- paths

def test_relative_paths_resolve_against_the_file(tmp_path: Path) -> None:
    """Relative paths in a config file are relative to the file's directory."""
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    conf = write(conf_dir / "agent.toml",
                 'data_dir = "data"\nschema_file = "../schemas/fleet.toml"\n'
                 '[storage]\nencryption_key_file = "keys/agent.key"\n'
                 '[mqtt.tls]\nca_file = "/abs/ca.pem"\n')
    cfg = load_config(AgentConfig, conf, {})
    assert cfg.data_dir == conf_dir / "data"
    assert cfg.schema_path() == conf_dir / "../schemas/fleet.toml"
    assert cfg.storage.encryption_key_file == conf_dir / "keys/agent.key"
    assert cfg.mqtt.tls is not None and cfg.mqtt.tls.ca_file == Path("/abs/ca.pem")


def test_relative_config_path_gives_absolute_paths(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading `agent.toml` from the working directory still anchors paths absolutely."""
    write(tmp_path / "agent.toml", 'data_dir = "data"\n')
    monkeypatch.chdir(tmp_path)
    cfg = load_config(AgentConfig, Path("agent.toml"), {})
    assert cfg.data_dir == tmp_path / "data" and cfg.data_dir.is_absolute()


def test_env_and_default_paths_stay_relative_to_cwd() -> None:
    """Paths from environment overrides and defaults are left relative to the cwd."""
    cfg = load_config(BrokerConfig, None, {"WAYSTATION_BROKER__DATA_DIR": "b"})
    assert cfg.data_dir == Path("b") and cfg.resolved_password_file() == Path("b/passwd")


def test_state_directory_expanded_at_load(tmp_path: Path) -> None:
    """${NAME} in a non-credential path is expanded when the config is loaded."""
    conf = write(tmp_path / "agent.toml", 'data_dir = "${STATE_DIRECTORY}/agent"\n')
    cfg = load_config(AgentConfig, conf, {"STATE_DIRECTORY": "/var/lib/waystation"})
    assert cfg.data_dir == Path("/var/lib/waystation/agent")


def test_unset_variable_in_data_dir_is_an_error(tmp_path: Path) -> None:
    """An unset ${NAME} outside credential paths fails at load, naming file and key."""
    conf = write(tmp_path / "agent.toml", 'data_dir = "${STATE_DIRECTORY}/agent"\n')
    with pytest.raises(ConfigError, match=r"agent\.toml: data_dir: \$\{STATE_DIRECTORY\}"):
        load_config(AgentConfig, conf, {})


# ----------------------------------------------------------------------- overrides

def test_env_overrides_nested_values_over_the_file(tmp_path: Path) -> None:
    """WAYSTATION_AGENT__MQTT__PORT overrides the file's [mqtt] port and keeps its host."""
    conf = write(tmp_path / "agent.toml", '[mqtt]\nhost = "broker"\nport = 1883\n')
    cfg = load_config(AgentConfig, conf, {"WAYSTATION_AGENT__MQTT__PORT": "1884"})
    assert (cfg.mqtt.host, cfg.mqtt.port) == ("broker", 1884)


def test_env_override_list_and_case_insensitive_keys() -> None:
    """Lists are written as TOML arrays; key parts are case-insensitive."""
    cfg = load_config(AgentConfig, None, {"waystation_agent__Scopes": '["a", "b"]',
                                          "WAYSTATION_AGENT__LOG__LEVEL": "debug"})
    assert cfg.scopes == ["a", "b"] and cfg.log.level == "debug"


def test_env_override_types() -> None:
    """Numbers, booleans and strings that look like numbers get the setting's type."""
    cfg = load_config(ServerConfig, None, {
        "WAYSTATION_SERVER__SERVER_ID": "42",
        "WAYSTATION_SERVER__METRICS_PORT": "9100",
        "WAYSTATION_SERVER__MERGE__RULES": '["rules.stock:no_negative"]',
        "WAYSTATION_SERVER__MQTT__TLS": '{ insecure = true }',
        "WAYSTATION_SERVER__MQTT__PASSWORD": '"quoted secret"',
        "WAYSTATION_SERVER__SHARED_GROUP": "",
    })
    assert cfg.server_id == "42" and cfg.metrics_port == 9100
    assert cfg.merge.rules == ["rules.stock:no_negative"]
    assert cfg.mqtt.tls is not None and cfg.mqtt.tls.insecure is True
    assert cfg.mqtt.resolved_password({}) == "quoted secret"
    assert cfg.shared_group is None


def test_env_override_password_file_with_credentials_directory(tmp_path: Path) -> None:
    """An override may point password_file into the systemd credentials directory."""
    (tmp_path / "pw").write_text("secret\n", encoding="utf-8")
    env = {"WAYSTATION_AGENT__MQTT__PASSWORD_FILE": "${CREDENTIALS_DIRECTORY}/pw"}
    cfg = load_config(AgentConfig, None, env)
    assert cfg.mqtt.resolved_password({"CREDENTIALS_DIRECTORY": str(tmp_path)}) == "secret"


def test_unknown_env_key_names_the_variable() -> None:
    """An override naming no setting is a ConfigError naming the variable, with a hint."""
    with pytest.raises(ConfigError, match=r"^WAYSTATION_AGENT__MQTT__PROT: 'mqtt\.prot' is not "
                                          r"a setting of the agent config; did you mean 'port'"):
        load_config(AgentConfig, None, {"WAYSTATION_AGENT__MQTT__PROT": "1884"})


def test_env_key_below_a_value_is_refused() -> None:
    """An override that goes below a plain value is refused, naming the variable."""
    with pytest.raises(ConfigError, match=r"^WAYSTATION_BROKER__PORT__X: 'port' is a single"):
        load_config(BrokerConfig, None, {"WAYSTATION_BROKER__PORT__X": "1"})


def test_single_underscore_override_is_refused() -> None:
    """WAYSTATION_AGENT_MQTT__PORT (one underscore) is refused instead of ignored."""
    with pytest.raises(ConfigError, match=r"^WAYSTATION_AGENT_MQTT__PORT: not a valid override"):
        load_config(AgentConfig, None, {"WAYSTATION_AGENT_MQTT__PORT": "1"})


def test_other_parts_and_variables_are_ignored() -> None:
    """Overrides of other parts and unrelated variables do not affect this part."""
    cfg = load_config(AgentConfig, None, {"WAYSTATION_SERVER__NOPE": "1", "PATH": "/bin",
                                          "WAYSTATION_AGENT_CONFIG": "/etc/x.toml"})
    assert cfg.mqtt.port == 1883


def test_bad_env_value_names_the_variable_and_key() -> None:
    """A value that does not validate names the variable and the dotted key."""
    with pytest.raises(ConfigError, match=r"^WAYSTATION_AGENT__MQTT__PORT: mqtt\.port: must be "
                                          r"a whole number from 1 to 65535 \(got \"many\"\)$"):
        load_config(AgentConfig, None, {"WAYSTATION_AGENT__MQTT__PORT": "many"})
    with pytest.raises(ConfigError, match=r"^WAYSTATION_AGENT__SCOPES: scopes: "):
        load_config(AgentConfig, None, {"WAYSTATION_AGENT__SCOPES": "depot 1"})


def test_env_value_conflicting_with_file_names_both(tmp_path: Path) -> None:
    """A cross-field error involving an override names the file and the variable."""
    conf = write(tmp_path / "server.toml", "[store]\nmap_size_mb = 256\n")
    with pytest.raises(ConfigError) as info:
        load_config(ServerConfig, conf, {"WAYSTATION_SERVER__STORE__KIND": "postgres"})
    message = str(info.value)
    assert "server.toml with WAYSTATION_SERVER__STORE__KIND: store.url: required" in message


def test_env_overrides_lists_applied_variables() -> None:
    """env_overrides reports which variable sets which key."""
    env = {"WAYSTATION_AGENT__MQTT__PORT": "1884", "HOME": "/root"}
    assert env_overrides(AgentConfig, env) == {"WAYSTATION_AGENT__MQTT__PORT": "mqtt.port"}


def test_part_can_be_given_explicitly() -> None:
    """part= selects the variable prefix independently of the model."""
    cfg = load_config(BrokerConfig, None, {"WAYSTATION_EDGE__PORT": "1999"}, part="edge")
    assert cfg.port == 1999
