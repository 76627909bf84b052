"""configure_logging: structlog and stdlib logs share one stream, as text or JSON."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from waystation.config import LogConfig
from waystation.logs import configure_logging


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    structlog.reset_defaults()


def test_json_lines_have_timestamp_level_logger() -> None:
    """format = "json" writes one JSON object per event with ISO time, level and logger."""
    out = io.StringIO()
    configure_logging(LogConfig(format="json", level="info"), stream=out)
    structlog.get_logger("agent.sender").info("batch_sent", changes=3)
    record = json.loads(out.getvalue().strip())
    assert record["event"] == "batch_sent" and record["changes"] == 3
    assert record["level"] == "info" and record["logger"] == "agent.sender"
    assert record["timestamp"].endswith("Z") and "T" in record["timestamp"]
    assert list(record)[:4] == ["timestamp", "level", "logger", "event"]


def test_level_filters_our_events() -> None:
    """Events below the configured level are dropped."""
    out = io.StringIO()
    configure_logging(LogConfig(format="json", level="warning"), stream=out)
    log = structlog.get_logger("broker.server.daemon")
    log.info("quiet")
    log.warning("loud")
    events = [json.loads(line)["event"] for line in out.getvalue().splitlines()]
    assert events == ["loud"]


def test_stdlib_libraries_routed_at_warning() -> None:
    """paho / amqtt / asyncio logs go through the same renderer, WARNING and above only."""
    out = io.StringIO()
    configure_logging(LogConfig(format="json", level="debug"), stream=out)
    logging.getLogger("paho.mqtt.client").info("chatty")
    logging.getLogger("amqtt.broker").warning("client %s dropped", "van-1")
    logging.getLogger("asyncio").debug("selector")
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(r["logger"], r["event"], r["level"]) for r in records] == [
        ("amqtt.broker", "client van-1 dropped", "warning")]


def test_console_format_is_key_value_text() -> None:
    """format = "console" writes readable text with key=value pairs and no colours."""
    out = io.StringIO()
    configure_logging(LogConfig(format="console", level="debug"), stream=out)
    structlog.get_logger("agent.receiver").debug("delta_applied", scope="route-42")
    line = out.getvalue()
    assert "delta_applied" in line and "scope=route-42" in line and "agent.receiver" in line
    assert "\x1b[" not in line


def test_reconfiguring_replaces_the_handler() -> None:
    """Calling configure_logging twice leaves one handler: events are not duplicated."""
    first, second = io.StringIO(), io.StringIO()
    configure_logging(LogConfig(format="json"), stream=first)
    configure_logging(LogConfig(format="json"), stream=second)
    structlog.get_logger("agent.x").warning("once")
    assert first.getvalue() == "" and len(second.getvalue().splitlines()) == 1


def test_exception_tracebacks_have_no_locals() -> None:
    """JSON tracebacks do not include local variables (they may hold secrets)."""
    out = io.StringIO()
    configure_logging(LogConfig(format="json"), stream=out)
    password = "hunter2"  # noqa: F841 - a local that must not be logged
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        structlog.get_logger("agent.x").exception("failed")
    text = out.getvalue()
    assert "RuntimeError" in text and "hunter2" not in text
