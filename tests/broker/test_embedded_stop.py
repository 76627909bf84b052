"""EmbeddedBroker.stop: a clean amqtt shutdown is awaited; one that hangs does not keep
the broker (and so SIGTERM) from ending."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from broker.embedded.amqtt_broker import BrokerSettings, EmbeddedBroker


class _Amqtt:
    """Stands in for amqtt's Broker: shutdown() finishes at once, or never."""

    def __init__(self, hangs: bool) -> None:
        self.hangs = hangs
        self.shutdown_started = False
        self.cancelled = False

    async def shutdown(self) -> None:
        self.shutdown_started = True
        try:
            if self.hangs:
                await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise


def _broker(tmp_path: Path, amqtt: _Amqtt) -> EmbeddedBroker:
    broker = EmbeddedBroker(BrokerSettings(host="127.0.0.1", port=1,
                                           password_file=tmp_path / "passwd"))
    broker._broker = amqtt  # type: ignore[assignment]  # started, as far as stop() knows
    return broker


def test_stop_waits_for_a_shutdown_that_finishes(tmp_path: Path) -> None:
    """The usual case: amqtt's shutdown runs to its end, nothing is cancelled."""
    amqtt = _Amqtt(hangs=False)
    broker = _broker(tmp_path, amqtt)
    asyncio.run(broker.stop(timeout=5))
    assert amqtt.shutdown_started and not amqtt.cancelled
    assert not broker.running


def test_stop_gives_up_on_a_shutdown_that_hangs(tmp_path: Path) -> None:
    """A shutdown stuck for good is cancelled after the timeout and stop() returns."""
    amqtt = _Amqtt(hangs=True)
    broker = _broker(tmp_path, amqtt)
    started = time.monotonic()
    asyncio.run(broker.stop(timeout=0.2))
    took = time.monotonic() - started
    assert amqtt.shutdown_started and amqtt.cancelled
    assert 0.2 <= took < 5, took
    assert not broker.running
    asyncio.run(broker.stop(timeout=0.2))  # idempotent
