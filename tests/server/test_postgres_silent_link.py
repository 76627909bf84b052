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

from tests.pgserver import PgServer
from tests.silent_link import SilentLink, silent_link

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]

STORE_PROCESS = textwrap.dedent("""
    import json, sys, threading, time
    from broker.errors import StoreError
    from broker.server.store.base import ServerRow
    from broker.server.store.postgres import store as pg

    pg.LINK_DEFAULTS["tcp_user_timeout"] = 2_000
    store = pg.PostgresStore(sys.argv[1], reconnect_s=4, connect_timeout_s=2)
    n = 0

    def write() -> dict:
        global n
        n += 1
        row = ServerRow("s1", "main", "t", 1, n)
        result: dict = {"outcome": "hung"}
        def run() -> None:
            try:
                store.transact(lambda txn: txn.put_server(row))
                result["outcome"] = "ok"
            except StoreError as exc:
                result.update(outcome="store_error", message=str(exc))
        start = time.monotonic()
        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        worker.join(timeout=40)
        result["seconds"] = round(time.monotonic() - start, 1)
        return result

    print(json.dumps(write()), flush=True)
    for line in sys.stdin:
        outcome = write()
        print(json.dumps(outcome), flush=True)
        if outcome["outcome"] == "hung":
            import os
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
