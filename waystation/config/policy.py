"""The agent's sync policy config (`[policy]` in agent.toml; `agent.policy` applies it).

    [policy]
    windows = ["Mon-Fri 22:00-06:00", "Sat,Sun 00:00-24:00"]   # empty: always open
    timezone = "Europe/Berlin"            # windows' wall clock; default: the device's
    high_priority = 100                   # changes with priority >= this never wait
    server_group = "main"                 # the merge server group to wait for
    wait_for_server = true
    sync_now_s = 600                      # how long an explicit "sync now" lifts limits

    [policy.metered]
    file = "/run/waystation/metered"      # or: command = ["/usr/local/bin/is-metered"]
    lanes = ["records"]                   # what may go over a metered link
    daily_bytes = 5000000                 # budget per local day on a metered link

    [policy.battery]
    min_percent = 20                      # below (and not charging): bulk work waits
    # file = ... / command = [...]; default: /sys/class/power_supply

    [policy.bandwidth]
    records_bytes_per_s = 20000           # cap per lane; unset: no cap
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, Field, field_validator, model_validator

from waystation.config.common import Bool, PositiveInt, Seconds, Str, _Model, _valid_id

LaneName = Literal["records", "files", "telemetry"]
Argv = Annotated[list[Annotated[str, Field(strict=True, min_length=1)]],
                 Field(min_length=1, max_length=64)]


def _records_only() -> list[LaneName]:
    return ["records"]


class _Probe(_Model):
    file: Path | None = None
    """Read this file (at most 4 KiB) for the answer."""
    command: Argv | None = None
    """Run this command (no shell) and read its stdout; a non-zero exit is no answer."""
    timeout_s: Annotated[float, Field(strict=True, gt=0, le=60)] = 5.0
    interval_s: Annotated[float, Field(strict=True, gt=0, le=86400)] = 30.0
    """Ask again at most this often (commands can be costly)."""

    @model_validator(mode="after")
    def _one_source(self) -> _Probe:
        if self.file is not None and self.command is not None:
            raise ValueError("set file or command, not both")
        return self


class MeteredConfig(_Probe):
    """Is the link metered? Answer ``1``/``yes``/``metered`` or ``0``/``no``/``unmetered``."""

    value: Bool | None = None
    """A fixed answer instead of a file or command (e.g. a cellular-only device)."""
    lanes: list[LaneName] = Field(default_factory=_records_only)
    daily_bytes: PositiveInt | None = None


class BatteryConfig(_Probe):
    """The battery: ``PERCENT [charging|discharging]`` from a file or command, else the
    Linux power_supply class."""

    min_percent: Annotated[float, Field(strict=True, ge=0, le=100)] | None = None
    sysfs: Path = Path("/sys/class/power_supply")


class BandwidthConfig(_Model):
    """A cap per lane, bytes per second (None: no cap); bursts up to `burst_s` of it."""

    records_bytes_per_s: PositiveInt | None = None
    files_bytes_per_s: PositiveInt | None = None
    telemetry_bytes_per_s: PositiveInt | None = None
    burst_s: Seconds = 2.0


def _window(value: str) -> str:
    from agent.policy.windows import parse_window  # the parser is the one truth
    parse_window(value)
    return value


class PolicyConfig(_Model):
    """When the agent may use the link, and for what (docs/agent-api.md, "Sync policy")."""

    windows: list[Annotated[str, Field(strict=True), AfterValidator(_window)]] = Field(
        default_factory=list, max_length=64)
    timezone: Str | None = None
    high_priority: Annotated[int, Field(strict=True)] = 100
    server_group: Annotated[Str, AfterValidator(_valid_id("server group"))] = "main"
    wait_for_server: Bool = True
    sync_now_s: Seconds = 600.0
    metered: MeteredConfig = Field(default_factory=MeteredConfig)
    battery: BatteryConfig = Field(default_factory=BatteryConfig)
    bandwidth: BandwidthConfig = Field(default_factory=BandwidthConfig)

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"{value!r} is not a time zone name such as "
                                 "'Europe/Berlin' or 'UTC'") from None
        return value


__all__ = ["BandwidthConfig", "BatteryConfig", "MeteredConfig", "PolicyConfig"]
