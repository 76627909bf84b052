"""The embedded broker's subscription table changes while amqtt walks it (fix 12 of
`broker.embedded.amqtt_broker`): a client leaving during a delivery must not kill it."""

from __future__ import annotations

import asyncio
from collections import deque
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from broker.embedded.amqtt_overrides import SubscriptionTable, WaystationBroker
from broker.embedded.settings import BrokerSettings


def test_a_delivery_survives_a_filter_deleted_while_it_runs(tmp_path: Path) -> None:
    """A publish reaches the subscriptions after one whose filter was deleted while the
    broker awaited (a clean-session client disconnecting: amqtt deletes its filters);
    amqtt's loop died with "dictionary changed size during iteration" and the message
    went to nobody after that point (a traceback at every stop of a broker with a device
    and a server connected)."""
    asked: list[str] = []

    async def run() -> None:
        broker = WaystationBroker(
            BrokerSettings(port=1, password_file=tmp_path / "passwd").amqtt_config(),
            require_client_cert=False)
        first, leaving, last = (SimpleNamespace(client_id=c) for c in ("dev-a", "srv", "dev-c"))
        broker._subscriptions["x/#"] = [(first, 1)]
        broker._subscriptions["b/#"] = [(leaving, 1)]
        broker._subscriptions["+/y"] = [(last, 1)]

        async def acl(session: Any, *, topic: str, action: Any) -> bool:
            asked.append(session.client_id)
            if session is first:  # meanwhile: `srv` disconnects, its filter goes
                del broker._subscriptions["b/#"]
                await asyncio.sleep(0)
            return False  # not delivered: this test is about the walk, not the send

        broker._topic_filtering = acl  # type: ignore[method-assign]
        await broker._broadcast_queue.put({"topic": "x/y", "data": b"m", "session": None,
                                           "qos": 1})
        await broker._run_broadcast(deque())

    asyncio.run(run())
    assert asked == ["dev-a", "dev-c"]


@given(st.dictionaries(st.text("abc/+#", max_size=5), st.integers(), max_size=20),
       st.sampled_from(["iter", "keys", "items"]))
def test_the_table_can_change_during_any_walk(table: dict[str, int], how: str) -> None:
    """Plain iteration, keys and items walk the table as it was when the walk began,
    whatever leaves or subscribes meanwhile, and the table keeps every change."""
    subs = SubscriptionTable(table)
    walk = {"iter": lambda: iter(subs), "keys": lambda: iter(subs.keys()),
            "items": lambda: (k for k, _ in subs.items())}[how]()
    walked = []
    for key in walk:
        walked.append(key)
        del subs[key]              # a client leaves: its filter goes
        subs["\0" + key] = 1       # another subscribes
    assert walked == list(table)
    assert list(subs) == ["\0" + k for k in table]
