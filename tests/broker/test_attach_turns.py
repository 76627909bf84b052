"""broker.embedded.attach_turns: one connection of a client id at a time, other client
ids not held up, and nothing kept once the turns are over (pure, no broker)."""

from __future__ import annotations

import asyncio

from broker.embedded.attach_turns import AttachTurns


def test_turns_of_one_client_id_follow_each_other_and_are_forgotten() -> None:
    async def scenario() -> list[str]:
        turns, order = AttachTurns(), []

        async def connection(name: str, client_id: str) -> None:
            release = await turns.wait(client_id)
            order.append(f"{name} in")
            await asyncio.sleep(0)  # the take-over's awaits: the others run meanwhile
            await asyncio.sleep(0)
            order.append(f"{name} out")
            release()
            release()  # a second end (the safety path) changes nothing

        await asyncio.gather(connection("a", "van-1"), connection("b", "van-1"),
                             connection("c", "van-2"))
        assert len(turns) == 0
        return order

    order = asyncio.run(scenario())
    assert order.index("a out") < order.index("b in")  # van-1's turns follow each other
    assert order.index("c in") < order.index("a out")  # van-2 is not held up by van-1


def test_a_wait_cancelled_leaves_no_turn_behind() -> None:
    async def scenario() -> int:
        turns = AttachTurns()
        release = await turns.wait("van-1")
        waiting = asyncio.ensure_future(turns.wait("van-1"))
        await asyncio.sleep(0)
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        release()
        return len(turns)

    assert asyncio.run(scenario()) == 0
