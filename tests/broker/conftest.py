"""Fixtures of the broker-side tests: real broker subprocesses (see tests/fixtures_brokers.py)."""

from __future__ import annotations

from tests.fixtures_brokers import (
    any_broker,
    embedded_broker,
    mosquitto_broker,
)

__all__ = ["any_broker", "embedded_broker", "mosquitto_broker"]
