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
- **Paths** written in a config file are relative to the file's directory; paths from
  environment overrides and the built-in defaults are relative to the working
  directory. ``${NAME}`` in a path is expanded from the environment, e.g.
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

import difflib
import math
import re
import socket
import tomllib
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar, Union
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from waystation.errors import ConfigError

# Same as schemas.wire.ID_PATTERN (PROTOCOL.md §2); repeated here so that loading a
# config does not import every wire model. A test keeps the two equal.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_ID_RE = re.compile(ID_PATTERN)
_RULE_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_TOML_POS_RE = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")
_TOML_EOF_RE = re.compile(r"\s*\(at end of document\)$")

ENV_PREFIX = "WAYSTATION_"
MASK = "**********"
# Path settings that name credentials: an unset ${VAR} in them is expanded on use.
_CREDENTIAL_PATHS = frozenset({"password_file", "encryption_key_file", "key_file",
                               "cert_file", "ca_file"})

T = TypeVar("T", bound=BaseModel)


# --------------------------------------------------------------------------- helpers

def _valid_id(kind: str) -> typing.Callable[[str], str]:
    def check(value: str) -> str:
        if not _ID_RE.fullmatch(value):
            raise ValueError(
                f"{value!r} is not a valid {kind}: use 1 to 64 letters, digits, '_', '.' "
                "or '-', starting with a letter or digit")
        return value
    return check


def _topic_level(value: str) -> str:
    if not value:
        raise ValueError("must not be empty")
    if any(ch in value for ch in "+#/\x00"):
        raise ValueError(f"{value!r} is not a single MQTT topic level: "
                         "it must not contain '+', '#' or '/'")
    if value.startswith("$"):
        raise ValueError("must not start with '$' (reserved for the broker's own topics)")
    if len(value.encode("utf-8")) > 128:
        raise ValueError("must be at most 128 bytes")
    return value


def _optional_topic_level(value: str | None) -> str | None:
    return None if value is None else _topic_level(value)


def _rule_ref(value: str) -> str:
    if not _RULE_RE.fullmatch(value):
        raise ValueError(f"{value!r} is not a rule reference; write 'package.module:function'")
    return value


def _false_is_none(value: Any) -> Any:
    """TOML has no null: `false` (or "") switches off a setting that is on by default."""
    return None if value is False or value == "" else value


def _no_duplicates(value: list[str]) -> list[str]:
    seen: set[str] = set()
    for item in value:
        if item in seen:
            raise ValueError(f"{item!r} is listed twice")
        seen.add(item)
    return value


def default_device_id(hostname: str | None = None) -> str:
    """`dev-<hostname>`, sanitised to a valid device id (PROTOCOL.md §2)."""
    name = socket.gethostname() if hostname is None else hostname
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", name.split(".")[0] if name else "").strip("-._")
    return ("dev-" + (name or "unknown"))[:64].rstrip("-._")


def expand_path(path: Path, env: Mapping[str, str], *, key: str = "path") -> Path:
    """Expand `${NAME}` in `path` from `env`; ConfigError (naming `key`) if NAME is unset."""
    text = str(path)

    def sub(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in env:
            hint = (" (systemd sets it only for units with LoadCredential=)"
                    if name == "CREDENTIALS_DIRECTORY" else "")
            raise ConfigError(f"{key}: ${{{name}}} in {text!r} is not set in the environment{hint}")
        return env[name]

    return Path(_VAR_RE.sub(sub, text)) if "${" in text else path


# Constrained scalar types. Strict where TOML could otherwise sneak in a wrong type
# (true for a port, 2.5 for a count).
Port = Annotated[int, Field(strict=True, ge=1, le=65535)]
PositiveInt = Annotated[int, Field(strict=True, ge=1)]
Seconds = Annotated[float, Field(strict=True, gt=0)]
Bool = Annotated[bool, Field(strict=True)]
Str = Annotated[str, Field(strict=True)]
DeviceId = Annotated[str, Field(strict=True), AfterValidator(_valid_id("device id"))]
ScopeId = Annotated[str, Field(strict=True), AfterValidator(_valid_id("scope id"))]
UserName = Annotated[str, Field(strict=True), AfterValidator(_valid_id("user name"))]
LogLevel = Literal["debug", "info", "warning", "error"]
CompressOver = Annotated[Annotated[int, Field(strict=True, ge=0)] | None,
                         BeforeValidator(_false_is_none)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------- shared parts

class LogConfig(_Model):
    """How a process logs: key-value events, as text for people or JSON for journald."""

    level: LogLevel = "info"
    format: Literal["console", "json"] = "console"


class TlsConfig(_Model):
    """TLS towards the broker. cert_file + key_file enable client-certificate auth."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_hostname: Str | None = None
    insecure: Bool = False

    @model_validator(mode="after")
    def _pair(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (client-certificate auth): "
                             "set both or neither")
        return self


class MqttConfig(_Model):
    """How to reach the MQTT broker (PROTOCOL.md §1)."""

    host: Str = "127.0.0.1"
    port: Port = 1883
    prefix: Annotated[Str, AfterValidator(_topic_level)] = "waystation"
    username: Str | None = None
    password: SecretStr | None = None
    password_file: Path | None = Field(default=None, validate_default=True)
    keepalive_s: Annotated[int, Field(strict=True, ge=5, le=600)] = 30
    tls: TlsConfig | None = None
    connect_timeout_s: Annotated[float, Field(strict=True, gt=0, le=300)] = 10.0

    @field_validator("password_file")
    @classmethod
    def _one_password(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is not None and info.data.get("password") is not None:
            raise ValueError("cannot be used together with password; set only one of them")
        return value

    def resolved_password(self, env: Mapping[str, str]) -> str | None:
        """The password: `password`, else the contents of `password_file` (read now,
        `${NAME}` expanded from `env`, one trailing newline dropped), else None."""
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_file is None:
            return None
        path = expand_path(self.password_file, env, key="mqtt.password_file")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError(f"mqtt.password_file: cannot read {path} ({reason})") from None
        password = text.removesuffix("\n").removesuffix("\r")
        if not password:
            raise ConfigError(f"mqtt.password_file: {path} is empty")
        return password


class ServerMqttConfig(MqttConfig):
    """The server's broker connection: as MqttConfig, logging in as waystation-server."""

    username: Annotated[Str | None, BeforeValidator(_false_is_none)] = "waystation-server"


# ------------------------------------------------------------------------ the agent

class SyncConfig(_Model):
    """How the agent drains its outbox and follows the server."""

    batch_max_changes: Annotated[int, Field(strict=True, ge=1, le=1000)] = 500
    batch_max_bytes: Annotated[int, Field(strict=True, ge=1024, le=262144)] = 131072
    ack_timeout_s: Seconds = 10.0
    max_inflight_changes: PositiveInt = 5000
    backoff_initial_s: Seconds = 0.5
    backoff_max_s: Seconds = 60.0
    compress_over_bytes: CompressOver = 512
    status_interval_s: Seconds = 30.0
    gap_timeout_s: Seconds = 5.0
    catchup_page: Annotated[int, Field(strict=True, ge=1, le=5000)] = 1000
    poll_interval_s: Annotated[float, Field(strict=True, gt=0, le=60)] = 0.1

    @model_validator(mode="after")
    def _ordered(self) -> SyncConfig:
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError(f"backoff_max_s ({self.backoff_max_s}) is below "
                             f"backoff_initial_s ({self.backoff_initial_s})")
        if self.max_inflight_changes < self.batch_max_changes:
            raise ValueError(f"max_inflight_changes ({self.max_inflight_changes}) is below "
                             f"batch_max_changes ({self.batch_max_changes})")
        return self


class StorageConfig(_Model):
    """The agent's LMDB environment; optional encryption at rest."""

    map_size_mb: PositiveInt = 64
    max_map_size_mb: PositiveInt = 4096
    encryption_key_file: Path | None = None

    @model_validator(mode="after")
    def _sizes(self) -> StorageConfig:
        if self.max_map_size_mb < self.map_size_mb:
            raise ValueError(f"max_map_size_mb ({self.max_map_size_mb}) is below "
                             f"map_size_mb ({self.map_size_mb})")
        return self


class AgentConfig(_Model):
    """The device agent (`waystation agent ...`)."""

    PART: ClassVar[str] = "agent"

    device_id: DeviceId = Field(default_factory=default_device_id)
    data_dir: Path = Path("waystation-data/agent")
    scopes: Annotated[list[ScopeId], Field(min_length=1), AfterValidator(_no_duplicates)] = (
        Field(default_factory=lambda: ["default"]))
    schema_file: Path | None = None
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    sync: SyncConfig = Field(default_factory=SyncConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    log: LogConfig = Field(default_factory=LogConfig)

    def schema_path(self) -> Path:
        """The collection schema file: `schema_file`, else the bundled example."""
        return self.schema_file if self.schema_file is not None else _example_schema()

    def mqtt_username(self) -> str:
        """The broker user name: `mqtt.username`, else the device id (PROTOCOL.md §1)."""
        return self.mqtt.username if self.mqtt.username is not None else self.device_id


# ----------------------------------------------------------------------- the server

class StoreConfig(_Model):
    """Where the server keeps the authoritative data."""

    kind: Literal["lmdb", "postgres"] = "lmdb"
    url: Str | None = Field(default=None, validate_default=True)
    map_size_mb: PositiveInt = 256
    max_map_size_mb: PositiveInt = 65536
    # PostgreSQL: how long a transaction keeps reconnecting after the database went away
    # before its changes are refused as transient (`server_error`; devices resend them).
    reconnect_s: Annotated[float, Field(gt=0, le=3600)] = 30.0

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None, info: ValidationInfo) -> str | None:
        kind = info.data.get("kind")
        if kind == "postgres":
            if value is None:
                raise ValueError("required when kind = 'postgres' "
                                 "(e.g. url = \"postgresql://waystation@db/waystation\")")
            if not value.startswith(("postgresql://", "postgres://")):
                raise ValueError("must start with postgresql:// or postgres://")
        return value

    @model_validator(mode="after")
    def _sizes(self) -> StoreConfig:
        if self.max_map_size_mb < self.map_size_mb:
            raise ValueError(f"max_map_size_mb ({self.max_map_size_mb}) is below "
                             f"map_size_mb ({self.map_size_mb})")
        return self


class MergeConfig(_Model):
    """How the server validates and merges incoming changes."""

    max_skew_ms: Annotated[int, Field(strict=True, ge=0)] = 300_000
    skew_policy: Literal["restamp", "reject"] = "restamp"
    max_payload_bytes: Annotated[int, Field(strict=True, ge=1024, le=262144)] = 262144
    max_batch_changes: Annotated[int, Field(strict=True, ge=1, le=1000)] = 1000
    rules: list[Annotated[Str, AfterValidator(_rule_ref)]] = Field(default_factory=list)
    tombstone_retention_s: Annotated[int, Field(strict=True, ge=0)] = 30 * 24 * 3600
    # 0: a group is whatever queued up while the previous group was being committed
    # (group commit without a wait). A fixed wait delays every change on a quiet link
    # by the whole window (2 ms cost ~2.3 ms of a ~5.7 ms round trip, bench/e2e.py)
    # and buys nothing under load, where groups form on their own.
    batch_window_ms: Annotated[int, Field(strict=True, ge=0, le=1000)] = 0
    compress_over_bytes: CompressOver = 512


class EnrolConfig(_Model):
    """What `waystation device add` writes for a new device: how devices reach the
    broker (often not how the server does: TLS on a public name vs. loopback), the CA
    they verify it with, where their broker logins go, and optionally a CA that signs
    device client certificates."""

    broker_host: Str | None = None
    """Host name devices connect to (default: mqtt.host)."""
    broker_port: Port | None = None
    """Port devices connect to (default: mqtt.port)."""
    ca_file: Path | None = None
    """CA certificate devices verify the broker with; set, the agent config uses TLS and
    a copy of this file is written next to it."""
    server_hostname: Str | None = None
    """Name to verify in the broker's certificate, when it differs from broker_host."""
    password_file: Path | None = None
    """The broker's password file for device logins (Mosquitto's format). Default: the
    broker config's password_file (embedded broker)."""
    client_ca_cert: Path | None = None
    """With client_ca_key: issue each device a client certificate (CN = device id)."""
    client_ca_key: Path | None = None
    client_cert_days: Annotated[int, Field(strict=True, ge=1, le=3650)] = 825

    @model_validator(mode="after")
    def _client_ca(self) -> EnrolConfig:
        if (self.client_ca_cert is None) != (self.client_ca_key is None):
            raise ValueError("client_ca_cert and client_ca_key go together: set both to "
                             "issue device client certificates, or neither")
        if self.client_ca_cert is not None and self.ca_file is None:
            raise ValueError("client certificates need TLS: set ca_file too")
        return self


class ServerConfig(_Model):
    """The merge server (`waystation server ...`, `waystation device ...`)."""

    PART: ClassVar[str] = "server"

    server_id: Annotated[Str, AfterValidator(_valid_id("server id"))] = "server-1"
    data_dir: Path = Path("waystation-data/server")
    schema_file: Path | None = None
    store: StoreConfig = Field(default_factory=StoreConfig)
    mqtt: ServerMqttConfig = Field(default_factory=ServerMqttConfig)
    # None by default: the embedded broker (amqtt) has no shared subscriptions. Set it
    # (e.g. "waystation") on Mosquitto / EMQX to run several servers side by side.
    shared_group: Annotated[Str | None, BeforeValidator(_false_is_none),
                            AfterValidator(_optional_topic_level)] = None
    merge: MergeConfig = Field(default_factory=MergeConfig)
    enrol: EnrolConfig = Field(default_factory=EnrolConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    metrics_port: Port | None = None
    """Serve Prometheus metrics on this port (None: off)."""
    metrics_host: Str = "127.0.0.1"
    """Address the metrics endpoint binds to (0.0.0.0 to let a remote Prometheus scrape)."""

    def schema_path(self) -> Path:
        """The collection schema file: `schema_file`, else the bundled example."""
        return self.schema_file if self.schema_file is not None else _example_schema()


# ----------------------------------------------------------------------- the broker

class BrokerTlsConfig(_Model):
    """TLS listener of the embedded broker."""

    cert_file: Path
    key_file: Path
    ca_file: Path | None = None
    require_client_cert: Bool = False

    @model_validator(mode="after")
    def _ca(self) -> BrokerTlsConfig:
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("require_client_cert needs ca_file (the CA that signs "
                             "device certificates)")
        return self


class BrokerConfig(_Model):
    """The embedded amqtt broker (`waystation broker run`)."""

    PART: ClassVar[str] = "broker"

    host: Str = "127.0.0.1"
    port: Port = 1883
    tls_port: Port | None = None
    tls: BrokerTlsConfig | None = None
    data_dir: Path = Path("waystation-data/broker")
    password_file: Path | None = None
    prefix: Annotated[Str, AfterValidator(_topic_level)] = "waystation"
    server_users: Annotated[list[UserName], AfterValidator(_no_duplicates)] = Field(
        default_factory=lambda: ["waystation-server"])
    allow_anonymous: Bool = False
    log: LogConfig = Field(default_factory=LogConfig)

    @model_validator(mode="after")
    def _tls(self) -> BrokerConfig:
        if (self.tls_port is None) != (self.tls is None):
            raise ValueError("tls_port and [tls] go together: set both to open a TLS "
                             "listener, or neither")
        if self.tls_port is not None and self.tls_port == self.port:
            raise ValueError(f"tls_port ({self.tls_port}) must differ from port")
        return self

    def resolved_password_file(self) -> Path:
        """The Mosquitto-format password file: `password_file`, else data_dir/passwd."""
        return self.password_file if self.password_file is not None else self.data_dir / "passwd"


MODELS: dict[str, type[AgentConfig] | type[ServerConfig] | type[BrokerConfig]] = {
    "agent": AgentConfig,
    "server": ServerConfig,
    "broker": BrokerConfig,
}


def _example_schema() -> Path:
    from schemas.collection import example_catalog_path

    return example_catalog_path()


# ------------------------------------------------------------------------- loading

def load_config(model: type[T], path: Path | str | None = None,
                env: Mapping[str, str] | None = None, *, part: str | None = None) -> T:
    """Load `model` from the TOML file `path` (None: defaults only), then apply the
    `WAYSTATION_<PART>__...` overrides found in `env`, then validate.

    `part` defaults to the model's PART ("agent", "server", "broker"). Every problem is
    a ConfigError naming the file or variable and the dotted key.
    """
    return _load(model, path, env, part)[0]


def env_overrides(model: type[BaseModel], env: Mapping[str, str] | None,
                  part: str | None = None) -> dict[str, str]:
    """The override variables in `env` for this part, mapped to the dotted key each sets
    (ConfigError for one that names no setting)."""
    items = _env_items(model, env or {}, _part(model, part))
    return {var: ".".join(keys) for var, keys, _ in items}


def _part(model: type[BaseModel], part: str | None) -> str:
    name = part if part is not None else getattr(model, "PART", None)
    if not name:
        raise ValueError(f"{model.__name__} has no PART; pass part=")
    return str(name)


def _load(model: type[T], path: Path | str | None, env: Mapping[str, str] | None,
          part: str | None) -> tuple[T, dict[str, str]]:
    env = env if env is not None else {}
    part_name = _part(model, part)
    source = str(path) if path is not None else f"{part_name} config (defaults)"
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_toml(Path(path))
        _prepare_paths(model, data, Path(path).absolute().parent, env, source, ())
    env_sources: dict[tuple[str, ...], str] = {}
    for var, keys, value in _env_items(model, env, part_name):
        if isinstance(value, str) and _is_path_field(model, keys):
            value = _expand_config_path(value, env, keys, var, None)
        _set_nested(data, keys, value)
        env_sources[keys] = var
    try:
        config = model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, model, source, env_sources)) from None
    return config, {var: ".".join(keys) for keys, var in env_sources.items()}


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: line {line}: not UTF-8 text") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        pos = _TOML_POS_RE.search(msg)
        if pos:
            where = f"line {pos.group(1)}, column {pos.group(2)}"
            msg = msg[: pos.start()]
        else:
            where = f"line {text.count(chr(10)) + 1} (end of file)"
            msg = _TOML_EOF_RE.sub("", msg)
        raise ConfigError(f"{path}: {where}: invalid TOML: {msg}") from None


# ---- walking the models' field types

def _unwrap(annotation: Any) -> list[Any]:
    """The alternatives of a (possibly Optional / Union / Annotated) annotation."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        out: list[Any] = []
        for arg in typing.get_args(annotation):
            out.extend(_unwrap(arg))
        return out
    return [annotation]


def _submodel(annotation: Any) -> type[BaseModel] | None:
    for alt in _unwrap(annotation):
        if isinstance(alt, type) and issubclass(alt, BaseModel):
            return alt
    return None


def _model_at(model: type[BaseModel], keys: tuple[str | int, ...]) -> type[BaseModel] | None:
    current: type[BaseModel] | None = model
    for key in keys:
        if current is None or not isinstance(key, str) or key not in current.model_fields:
            return None
        current = _submodel(current.model_fields[key].annotation)
    return current


def _is_path_field(model: type[BaseModel], keys: tuple[str, ...]) -> bool:
    parent = _model_at(model, keys[:-1])
    field = parent.model_fields.get(keys[-1]) if parent is not None else None
    return field is not None and Path in _unwrap(field.annotation)


def _stringish(annotation: Any) -> tuple[bool, bool]:
    """(every non-None alternative is a string-like type, None is allowed)."""
    alts = _unwrap(annotation)
    nullable = type(None) in alts
    stringy = True
    for alt in alts:
        if alt is type(None):
            continue
        if typing.get_origin(alt) is Literal:
            stringy = stringy and all(isinstance(a, str) for a in typing.get_args(alt))
        else:
            stringy = stringy and alt in (str, Path, SecretStr)
    return stringy, nullable


def _prepare_paths(model: type[BaseModel], data: dict[str, Any], base: Path,
                   env: Mapping[str, str], source: str, loc: tuple[str, ...]) -> None:
    """Expand ${VAR} and anchor relative paths at the config file's directory."""
    for key, value in data.items():
        field = model.model_fields.get(key)
        if field is None:
            continue
        if isinstance(value, str) and Path in _unwrap(field.annotation):
            data[key] = _expand_config_path(value, env, (*loc, key), source, base)
        elif isinstance(value, dict):
            sub = _submodel(field.annotation)
            if sub is not None:
                _prepare_paths(sub, value, base, env, source, (*loc, key))


def _expand_config_path(value: str, env: Mapping[str, str], keys: tuple[str, ...],
                        source: str, base: Path | None) -> str:
    unset = [m.group(1) for m in _VAR_RE.finditer(value) if m.group(1) not in env]
    if unset and keys[-1] not in _CREDENTIAL_PATHS:
        raise ConfigError(f"{source}: {'.'.join(keys)}: ${{{unset[0]}}} in {value!r} is not "
                          "set in the environment")
    if not unset:
        value = str(expand_path(Path(value), env))
    if base is None or value.startswith("${") or Path(value).is_absolute():
        return value
    return str(base / value)


# ---- environment overrides

def _env_items(model: type[BaseModel], env: Mapping[str, str],
               part: str) -> Iterator[tuple[str, tuple[str, ...], Any]]:
    prefix = f"{ENV_PREFIX}{part.upper()}__"
    near = f"{ENV_PREFIX}{part.upper()}_"
    for var in sorted(env):
        upper = var.upper()
        if not upper.startswith(prefix):
            if upper.startswith(near) and "__" in upper[len(near):]:
                raise ConfigError(f"{var}: not a valid override; write {prefix}KEY__SUBKEY "
                                  "with double underscores")
            continue
        keys = tuple(var[len(prefix):].lower().split("__"))
        yield var, keys, _env_value(model, var, keys, env[var], part)


def _env_value(model: type[BaseModel], var: str, keys: tuple[str, ...], raw: str,
               part: str) -> Any:
    current: type[BaseModel] = model
    for depth, key in enumerate(keys):
        dotted = ".".join(keys[: depth + 1])
        field = current.model_fields.get(key)
        if field is None:
            raise ConfigError(f"{var}: {dotted!r} is not a setting of the {part} config"
                              f"{_suggest(key, current)}")
        if depth == len(keys) - 1:
            return _parse_env_scalar(field.annotation, raw)
        sub = _submodel(field.annotation)
        if sub is None:
            raise ConfigError(f"{var}: {'.'.join(keys[:depth + 1])!r} is a single value, "
                              "not a table; drop the rest of the name")
        current = sub
    raise ConfigError(f"{var}: names no setting")  # pragma: no cover - keys is never empty


def _parse_env_scalar(annotation: Any, raw: str) -> Any:
    stringy, nullable = _stringish(annotation)
    if raw == "" and nullable:
        return None
    if stringy:
        if raw[:1] in ("'", '"'):
            parsed = _toml_value(raw)
            if isinstance(parsed, str):
                return parsed
        return raw
    parsed = _toml_value(raw)
    return raw if parsed is _NOTHING else parsed


_NOTHING = object()


def _toml_value(raw: str) -> Any:
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return _NOTHING
    if isinstance(value, bool | int | float | str | list | dict):
        return value
    return _NOTHING  # dates and times: no setting takes one; keep the text


def _set_nested(data: dict[str, Any], keys: tuple[str, ...], value: Any) -> None:
    for key in keys[:-1]:
        child = data.get(key)
        if not isinstance(child, dict):
            child = data[key] = {}
        data = child
    old = data.get(keys[-1])
    if isinstance(old, dict) and isinstance(value, dict):
        data[keys[-1]] = {**old, **value}
    else:
        data[keys[-1]] = value


# ---- error messages

def _suggest(key: str, model: type[BaseModel] | None) -> str:
    if model is None:
        return ""
    close = difflib.get_close_matches(key, list(model.model_fields), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _describe(exc: ValidationError, model: type[BaseModel], source: str,
              env_sources: Mapping[tuple[str, ...], str]) -> str:
    problems: list[str] = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        dotted = ".".join(str(p) for p in loc)
        where = source
        for keys, var in env_sources.items():
            if loc[: len(keys)] == keys:
                where = var
                break
        else:
            inner = [var for keys, var in env_sources.items()
                     if keys[: len(loc)] == loc or (loc and keys[:-1] == loc[:-1])]
            if inner:
                where = f"{source} with {inner[0]}"
        kind = err["type"]
        msg = str(err["msg"]).removeprefix("Value error, ")
        if kind == "extra_forbidden":
            msg = "unknown key" + (_suggest(str(loc[-1]), _model_at(model, loc[:-1]))
                                   or " (not a setting here)")
        elif kind == "missing":
            msg = "required; add it"
        elif kind != "value_error" and err.get("input") is not None and not isinstance(
                err["input"], dict | BaseModel):
            shown = _show(loc, err["input"])
            if shown:
                msg += f" (got {shown})"
        problems.append(f"{where}: {dotted}: {msg}" if dotted else f"{where}: {msg}")
    text = problems[0]
    if len(problems) > 1:
        text += f" (and {len(problems) - 1} more: " + "; ".join(problems[1:]) + ")"
    return text


def _show(loc: tuple[Any, ...], value: Any) -> str:
    if any("password" in str(p) for p in loc):
        return ""
    if isinstance(value, str) and loc and loc[-1] == "url":
        value = _mask_url(value)
    try:
        text = _toml_scalar(value)
    except TypeError:
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --------------------------------------------------------------------------- dumping

def dump_toml(config: BaseModel, *, mask_secrets: bool = True, exclude_defaults: bool = False,
              header: str | None = None) -> str:
    """`config` as a TOML document that `load_config` reads back to an equal config.

    Secrets (passwords, the password in a store URL) are masked unless
    `mask_secrets=False`. `exclude_defaults` leaves out settings at their default.
    `header` becomes leading `#` comment lines.
    """
    lines: list[str] = []
    if header:
        lines.extend(f"# {line}".rstrip() for line in header.splitlines())
        lines.append("")
    body = _dump_table(config, (), mask_secrets, exclude_defaults)
    lines.extend(body)
    while lines and lines[0] == "":
        lines.pop(0)
    return "\n".join(lines).rstrip("\n") + "\n"


def _dump_table(model: BaseModel, path: tuple[str, ...], mask: bool, exclude: bool) -> list[str]:
    scalars: list[str] = []
    tables: list[str] = []
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        default = field.get_default(call_default_factory=True)
        if exclude and value == default:
            continue
        if isinstance(value, BaseModel):
            sub = _dump_table(value, (*path, name), mask, exclude)
            if sub:
                tables.append("")
                tables.extend(sub)
            continue
        if value is None:
            if default is not None:
                scalars.append(f"{_toml_key(name)} = false")
            continue
        if isinstance(value, SecretStr):
            value = MASK if mask else value.get_secret_value()
        elif name == "url" and isinstance(value, str) and mask:
            value = _mask_url(value)
        scalars.append(f"{_toml_key(name)} = {_toml_scalar(value)}")
    if not scalars and not tables:
        return []
    out: list[str] = []
    if path and (scalars or not tables):
        out.append("[" + ".".join(_toml_key(p) for p in path) + "]")
    out.extend(scalars)
    out.extend(tables)
    return out


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_string(key)


def _toml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, Path):
        return _toml_string(str(value))
    if isinstance(value, SecretStr):
        return _toml_string(MASK)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_scalar(v) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{_toml_key(str(k))} = {_toml_scalar(v)}" for k, v in value.items())
        return "{ " + items + " }" if items else "{}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n",
            "\f": "\\f", "\r": "\\r"}


def _toml_string(text: str) -> str:
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ch < " " or ch == "\x7f":
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _mask_url(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:{MASK}@{netloc[1]}"))


__all__ = [
    "ID_PATTERN",
    "MODELS",
    "AgentConfig",
    "BrokerConfig",
    "BrokerTlsConfig",
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
