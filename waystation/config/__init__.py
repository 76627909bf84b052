"""Configuration of every part: one frozen pydantic model per part, loaded from TOML.

    AgentConfig    the device agent          (waystation agent ...,  WAYSTATION_AGENT__*)
    ServerConfig   the merge server          (waystation server ..., WAYSTATION_SERVER__*)
    BrokerConfig   the embedded amqtt broker (waystation broker ..., WAYSTATION_BROKER__*)

`load_config(AgentConfig, path, env)` reads the TOML file (if any), applies environment
overrides and validates. Every model forbids unknown keys, so a typo is an error, and
every error is a `ConfigError` naming the file (or environment variable) and the dotted
key, e.g. ``agent.toml: mqtt.port: Input should be less than or equal to 65535``.

Conventions:

- **Environment overrides**: ``WAYSTATION_<PART>__<KEY>__<SUBKEY>=value``, keys
  case-insensitive (``WAYSTATION_AGENT__MQTT__PORT=1884``). A value is read as a TOML
  value (``1884``, ``true``, ``["a", "b"]``, ``{ host = "x" }``) unless the setting is
  a string, in which case it is taken literally (quotes are optional). An empty value
  sets an optional setting to "none". An override that names no setting is an error.
- **Paths** written in a config file, and the built-in default paths of a config read
  from a file (``data_dir``), are relative to the file's directory, so one file names
  the same store from any working directory; paths from environment overrides, and the
  defaults when no file is given, are relative to the working directory. ``${NAME}``
  in a path is expanded from the environment, e.g.
  ``password_file = "${CREDENTIALS_DIRECTORY}/mqtt-password"`` (systemd
  ``LoadCredential=``). In credential paths (``*password_file``, ``*key_file``,
  ``*cert_file``, ``ca_file``) an unset variable is kept and expanded when the file is
  read, so ``waystation config show`` and ``agent status`` work outside the service;
  anywhere else an unset variable is an error at load time. Use `expand_path` before
  opening a credential path.
- **"None" in TOML**: TOML has no null. Settings whose default is on but that can be
  switched off (``shared_group``, ``compress_over_bytes``) take ``false`` for off;
  other optional settings are simply left out.
- `dump_toml` writes a config back out as TOML (secrets masked unless asked not to).
"""


from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from waystation.config.common import (
    ID_PATTERN,
    MASK,
    LogConfig,
    MqttConfig,
    ServerMqttConfig,
    TlsConfig,
    default_device_id,
    expand_path,
)
from waystation.config.dump import dump_toml
from waystation.config.loading import env_overrides, load_config

if TYPE_CHECKING:
    from waystation.config.agent import AgentConfig, ApiConfig, StorageConfig, SyncConfig
    from waystation.config.broker import BrokerConfig, BrokerTlsConfig
    from waystation.config.server import (
        AmqpConfig,
        DeadLetterConfig,
        EnrolConfig,
        IntakeConfig,
        MergeConfig,
        ServerConfig,
        StoreConfig,
    )

    MODELS: dict[str, type[AgentConfig] | type[ServerConfig] | type[BrokerConfig]]

# The part models are imported on first use (PEP 562), each from its own module: an
# agent process then never builds the server's and the embedded broker's pydantic models,
# nor a server process the agent's (with its policy models). Building them is most of the
# package's import time, and every agent, sync, server and CLI process pays it at start
# (~0.1 s of CPU each, several times that under coverage).
_LAZY = {
    **dict.fromkeys(["AgentConfig", "ApiConfig", "StorageConfig", "SyncConfig"], "agent"),
    **dict.fromkeys(["BrokerConfig", "BrokerTlsConfig"], "broker"),
    **dict.fromkeys(["AmqpConfig", "DeadLetterConfig", "EnrolConfig", "IntakeConfig",
                     "MergeConfig", "ServerConfig", "StoreConfig"], "server"),
}


def __getattr__(name: str) -> Any:
    if name == "MODELS":
        value: Any = {"agent": __getattr__("AgentConfig"),
                      "server": __getattr__("ServerConfig"),
                      "broker": __getattr__("BrokerConfig")}
    elif name in _LAZY:
        value = getattr(importlib.import_module(f"waystation.config.{_LAZY[name]}"), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value   # looked up once
    return value


__all__ = [
    "ID_PATTERN",
    "MASK",
    "MODELS",
    "AgentConfig",
    "AmqpConfig",
    "ApiConfig",
    "BrokerConfig",
    "BrokerTlsConfig",
    "DeadLetterConfig",
    "EnrolConfig",
    "IntakeConfig",
    "LogConfig",
    "MergeConfig",
    "MqttConfig",
    "ServerConfig",
    "ServerMqttConfig",
    "StorageConfig",
    "StoreConfig",
    "SyncConfig",
    "TlsConfig",
    "default_device_id",
    "dump_toml",
    "env_overrides",
    "expand_path",
    "load_config",
]
