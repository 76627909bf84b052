"""Fixtures of the broker-side tests: real broker subprocesses (see tests/fixtures_brokers.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from broker.rabbitmq.definitions import definitions
from tests.fixtures_brokers import (
    PREFIX,
    SERVER_USER,
    USERS,
    any_broker,
    embedded_broker,
    mosquitto_broker,
)
from tests.helpers import RecordingClient
from tests.rabbitmq_cluster import RabbitCluster, start_cluster_or_fail
from waystation.mqtt import MqttLink

__all__ = ["any_broker", "embedded_broker", "mosquitto_broker", "rabbit_cluster"]


@pytest.fixture(scope="package")
def rabbit_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitCluster]:
    """One three-node RabbitMQ cluster for this package's tests (none of them kills a
    node), with the test fleet's users imported from broker.rabbitmq.definitions."""
    c = start_cluster_or_fail(tmp_path_factory.mktemp("rabbit"))
    try:
        devices = {u: p for u, p in USERS.items() if u != SERVER_USER}
        c.import_definitions(definitions(prefix=PREFIX, server_users={
            SERVER_USER: USERS[SERVER_USER]}, devices=devices))
        yield c
    finally:
        c.stop()


@pytest.fixture
def clients() -> Iterator[list[RecordingClient]]:
    """Recording clients a test makes, closed after it."""
    made: list[RecordingClient] = []
    yield made
    for client in made:
        client.close()


@pytest.fixture
def links() -> Iterator[list[MqttLink]]:
    """MQTT links a test makes, stopped after it."""
    made: list[MqttLink] = []
    yield made
    for link in made:
        link.stop()
