"""What the store processes of tests/server/test_postgres_silent_link.py share: each runs
in the test's network namespace (`python -c SCRIPT URL`, from the repository's root),
opens a PostgreSQL store with the link bounds lowered to keep the test short, and times
its transactions in a thread of their own, so a call that hangs is reported as "hung"
instead of hanging the process."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

from broker.errors import StoreError
from broker.server.store.base import WriteTxn
from broker.server.store.postgres import store as pg


def open_store(url: str) -> pg.PostgresStore:
    """The store at `url`, logging to stderr (stdout is the test's channel): a query's
    unacknowledged data bounded to 2 s (the product's is 25 s), reconnects for 4 s,
    connects time out after 2 s."""
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    pg.LINK_DEFAULTS["tcp_user_timeout"] = 2_000
    return pg.PostgresStore(url, reconnect_s=4, connect_timeout_s=2)


def timed(store: pg.PostgresStore, fn: Callable[[WriteTxn], Any],
          timeout: float) -> dict[str, Any]:
    """`store.transact(fn)` in a daemon thread given `timeout` seconds: {"outcome": "ok",
    "store_error" (with its "message") or "hung", "seconds": how long it took}."""
    result: dict[str, Any] = {"outcome": "hung"}

    def run() -> None:
        try:
            store.transact(fn)
            result["outcome"] = "ok"
        except StoreError as exc:
            result.update(outcome="store_error", message=str(exc))

    start = time.monotonic()
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=timeout)
    result["seconds"] = round(time.monotonic() - start, 1)
    return result


__all__ = ["open_store", "timed"]
