"""The PostgreSQL store when the database's host goes silent in the middle of a query: no
reset, no FIN, packets simply vanish (a cut cable, a dropping firewall, a host powered
off). The store runs in a network namespace of the test's own and reaches PostgreSQL
through a veth pair whose host end the test takes down (tests/silent_link.py).

Without a bound on unacknowledged data (`LINK_DEFAULTS["tcp_user_timeout"]`) the
kernel retransmits for ~15 minutes and the merge server hangs that long. With it the
transaction fails within the bound plus the reconnect window, as a `StoreError` telling
the operator what to check, and once the link is back the next transaction reconnects
and commits. The bound is lowered to 2 s in the store's process to keep the test short;
the mechanism is the one the product uses with its 25 s default."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.helpers import wait_until
from tests.pgserver import PgServer
from tests.silent_link import SilentLink, silent_link

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]

STORE_PROCESS = textwrap.dedent("""
    import json, os, sys
    from broker.server.store.base import ServerRow
    from tests.server.pg_silent_child import open_store, timed

    store = open_store(sys.argv[1])
    n = 0

    def write() -> dict:
        global n
        n += 1
        row = ServerRow("s1", "main", "t", 1, n)
        return timed(store, lambda txn: txn.put_server(row), 40)

    print(json.dumps(write()), flush=True)
    for line in sys.stdin:
        outcome = write()
        print(json.dumps(outcome), flush=True)
        if outcome["outcome"] == "hung":
            os._exit(3)
""")


@pytest.fixture
def link(pg_server: PgServer) -> Iterator[SilentLink]:
    with silent_link(pg_server.port) as made:
        yield made


def _through(url: str, link: SilentLink) -> str:
    parts = urlsplit(url)
    user = parts.netloc.rsplit("@", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}@{link.address}:{link.port}"))


def _next(proc: subprocess.Popen[str]) -> dict[str, object]:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    assert line, f"the store's process died: {proc.wait(timeout=10)}"
    result: dict[str, object] = json.loads(line)
    return result


def test_a_silent_database_host_is_a_store_error_not_a_hang_then_it_recovers(
        pg_database: str, link: SilentLink) -> None:
    proc = link.run_in_namespace([sys.executable, "-c", STORE_PROCESS,
                                  _through(pg_database, link)],
                                 cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline() or "{}")
        assert first.get("outcome") == "ok", first  # the link works

        link.cut()
        cut = _next(proc)
        # 2 s for the query in flight, then the reconnect window (4 s, connects time out
        # after 2 s each): an error the operator can act on, within seconds.
        assert cut["outcome"] == "store_error", cut
        assert float(cut["seconds"]) < 15, cut  # type: ignore[arg-type]
        assert "PostgreSQL" in str(cut["message"]), cut

        link.heal()
        healed = _next(proc)
        assert healed["outcome"] == "ok", healed
        assert float(healed["seconds"]) < 15, healed  # type: ignore[arg-type]
    finally:
        proc.kill()
        proc.wait(timeout=10)


# A transaction of the store holds a scope's row lock when the link goes silent; the
# database's backend for it is left "idle in transaction", holding the lock, and nothing
# tells it that its client is gone (broker.server.store.postgres.orphans).
HOLDING_PROCESS = textwrap.dedent("""
    import json, sys
    from tests.server.pg_silent_child import open_store, timed

    store = open_store(sys.argv[1])
    store.transact(lambda txn: txn.lock_scopes(["a", "b"]))  # both rows exist

    def hold(txn) -> None:
        txn.lock_scopes(["a"])
        print(json.dumps({"outcome": "locked"}), flush=True)
        sys.stdin.readline()  # the link goes silent meanwhile
        txn.lock_scopes(["b"])  # a statement: its packets vanish

    print(json.dumps(timed(store, hold, 90)), flush=True)
    sys.stdin.readline()  # the link is back
    print(json.dumps(timed(store, lambda txn: txn.lock_scopes(["a"]), 90)), flush=True)
""")


def test_a_lock_held_by_a_transaction_lost_on_a_silent_link_is_released_at_reconnect(
        pg_database: str, link: SilentLink) -> None:
    """Once the link is back, the next transaction on the same scope commits within
    seconds, not after the database's idle-in-transaction timeout (60 s): the store ends
    the lost connection's backend when it reconnects."""
    proc = link.run_in_namespace([sys.executable, "-c", HOLDING_PROCESS,
                                  _through(pg_database, link)],
                                 cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        locked = json.loads(proc.stdout.readline() or "{}")
        assert locked.get("outcome") == "locked", locked
        # The database's answer acknowledged by the store's side: the cut leaves the host
        # nothing to retransmit, so no reset will reach the backend after the heal.
        wait_until(lambda: link.unacknowledged() == 0, 10,
                   message="the namespace acknowledged everything the host sent")
        link.cut()
        lost = _next(proc)
        assert lost["outcome"] == "store_error", lost

        link.heal()
        after = _next(proc)
        assert after["outcome"] == "ok", after
        assert float(after["seconds"]) < 15, after  # type: ignore[arg-type]
    finally:
        proc.kill()
        proc.wait(timeout=10)
