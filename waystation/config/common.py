"""Shared pieces of the config models: validators, paths, MQTT, TLS and log settings."""

from __future__ import annotations

import re
import socket
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
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
    renew_before_days: Annotated[int, Field(strict=True, ge=0, le=3650)] = 30
    """Agent only (the server ignores it): with a client certificate, renew it by itself
    (capability cert_renew) once it expires within this many days; 0: only when the
    operator orders it (`waystation device renew-cert`)."""

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


def _example_schema() -> Path:
    from schemas.collection import example_catalog_path

    return example_catalog_path()
