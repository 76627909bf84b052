"""The merge server's stop past its grace (`MergeServer._abandon`): it calls its own
store's `interrupt` (part of every `Store`), and the worker writes its last flush
("stopped cleanly") only through a store that still works: LMDB's interrupt is a no-op,
PostgreSQL's fails every later call."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from broker.errors import StoreError
from broker.server.daemon import MergeServer
from broker.server.store import open_store
from tests.server.helpers import CATALOG
from waystation.config import ServerConfig, load_config


@pytest.fixture
def env(server_cli_env: dict[str, str]) -> dict[str, str]:
    """A server's environment on an LMDB store and on a fresh PostgreSQL database."""
    return {**server_cli_env, "WAYSTATION_SERVER__MQTT__PASSWORD": "x"}


def test_abandon_interrupts_the_owned_store_and_flushes_only_through_a_live_one(
        env: dict[str, str]) -> None:
    cfg = load_config(ServerConfig, None, env)
    server = MergeServer(cfg, CATALOG, env=env)  # opens, so owns, its store
    try:
        interruptible = server.store.interruptible
        with capture_logs() as logs:
            server._abandon()
            server._work()  # the worker, once its call returned: it leaves at once
        assert [e["event"] for e in logs if e["log_level"] in ("error", "critical")] == []
        if interruptible:
            with pytest.raises(StoreError):
                server.store.transact(lambda txn: txn.servers())
    finally:
        server.store.close()
    store = open_store(cfg)
    try:
        with store.read() as txn:
            rows = {r.id: r for r in txn.servers()}
    finally:
        store.close()
    # the row the server wrote when it started; "stopped cleanly" only from a last flush
    stopped = rows[cfg.server_id].stopped_ms
    assert (stopped == 0) if interruptible else (stopped > 0)
