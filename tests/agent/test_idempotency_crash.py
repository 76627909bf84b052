"""An idempotent write and its key are one LMDB commit (agent.idempotency): a process
killed between making the write and recording its key leaves neither, so the retry
with the key is applied once -- never a write without its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import idempotency
from agent.api import Agent
from agent.idempotency import Replayed
from schemas.collection import Catalog
from tests.agent.agentkit import make_cfg
from tests.agent.crashing import kill_when_ready
from tests.agent.idem_crasher import KEY


def _stock(agent: Agent) -> int:
    record = agent.get("inventory", "bin-a")
    assert record is not None
    return int(record.fields.get("stock", 0))


def test_kill_9_between_the_write_and_its_key_leaves_neither(tmp_path: Path,
                                                              catalog: Catalog) -> None:
    """SIGKILL after the increment was written inside the transaction, before its key
    was: after the restart no increment and no key; the retry writes once, then
    replays."""
    data = tmp_path / "data"
    ready = tmp_path / "ready"
    out = kill_when_ready("idem_crasher.py", data, ready)
    before_n = int(out.split("before")[1].split()[0])
    with Agent.open(make_cfg(data), catalog) as agent:
        assert [e["ch"]["n"] for e in agent.pending()] == list(range(1, before_n + 1))
        assert _stock(agent) == 0
        assert agent._read(idempotency.count) == 0
        assert agent.idempotent_answer(KEY) is None
        first = agent.increment("inventory", "bin-a", "stock", -2, once=KEY)
        assert first.n == before_n + 1
        with pytest.raises(Replayed) as again:
            agent.increment("inventory", "bin-a", "stock", -2, once=KEY)
        assert (again.value.status, again.value.answer) == (202, first.to_dict())
        assert _stock(agent) == -2 and len(agent.pending()) == before_n + 1
