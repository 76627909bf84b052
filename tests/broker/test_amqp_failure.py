"""broker.server.amqp_failure: the reason a failed AMQP connection is logged with names
its cause, however deep pika wrapped it."""

from __future__ import annotations

import logging

import pika.exceptions
from pika.adapters.utils import connection_workflow as cw

from broker.server.amqp_failure import quiet_pika, reason


def test_an_unreachable_node_names_the_socket_error() -> None:
    """pika's empty AMQPConnectionError around the socket error: the socket error."""
    exc = pika.exceptions.AMQPConnectionError(
        cw.AMQPConnectorSocketConnectError(OSError(113, "No route to host")))
    assert str(exc) == ""  # what the server logged before: `AMQPConnectionError`
    assert reason(exc) == "AMQPConnectionError: No route to host (OSError errno 113)"


def test_a_workflow_failure_names_its_last_attempt() -> None:
    """A timed-out attempt (a silent node) says so."""
    inner = cw.AMQPConnectorStackTimeout("Timeout during AMQP handshake")
    exc = pika.exceptions.AMQPConnectionError(inner)
    assert reason(exc) == ("AMQPConnectionError: AMQPConnectorStackTimeout: "
                           "Timeout during AMQP handshake")


def test_a_plain_error_keeps_its_text() -> None:
    """A heartbeat timeout or a refused login: its own text, unchanged."""
    exc = pika.exceptions.AMQPHeartbeatTimeout("No activity in the last 2 seconds")
    assert reason(exc) == "AMQPHeartbeatTimeout: No activity in the last 2 seconds"
    assert reason(pika.exceptions.AMQPConnectionError()) == "AMQPConnectionError"
    assert reason(ConnectionResetError(104, "Connection reset by peer")) == \
        "ConnectionResetError: [Errno 104] Connection reset by peer"


def test_a_cycle_of_wrapped_errors_ends() -> None:
    """Errors that wrap each other do not loop forever."""
    a, b = ValueError("a"), ValueError("b")
    a.__cause__, b.__cause__ = b, a
    assert reason(a) == "ValueError: a"


def test_pika_logs_only_what_is_critical() -> None:
    """The link reports failures itself: pika's error lines are not repeated beside it."""
    quiet_pika()
    assert not logging.getLogger("pika.adapters.blocking_connection").isEnabledFor(
        logging.ERROR)
