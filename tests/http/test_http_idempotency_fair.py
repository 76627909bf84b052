"""The bound on Idempotency-Key records is fair between apps (agent.idempotency): an app
sending keys without end pushes out its own oldest keys, not another app's, so the other
app can still retry a write whose answer it lost."""

from __future__ import annotations

from pathlib import Path

from agent import idempotency
from agent.api import Agent
from agent.core import Work
from schemas.collection import Catalog
from tests.http.httpkit import Client, issue
from tests.http.test_http_idempotency import INC, T1, S, _api, _held, _key
from waystation.config import AgentConfig

T2 = "/v1/collections/tasks/records/t-2"


def _attempts(client: Client, path: str) -> int:
    return int(client.call("GET", path).body["fields"]["attempts"])


def test_an_app_flooding_keys_does_not_push_out_another_apps_keys(
        cfg: AgentConfig, catalog: Catalog) -> None:
    """max_keys 20: the scanner app records 5 keys, then a runaway app sends 500. The
    scanner's 5 still replay (its retried increments move nothing); the runaway app's
    newest replay and its oldest are forgotten; never more than 20 records."""
    with _api(cfg, catalog, idempotency_max_keys=20) as (server, agent, runaway):
        assert server.socket_path is not None
        scanner = Client(server.socket_path, issue(Path(cfg.data_dir), app="scanner"))
        try:
            scanner.call("PATCH", T1, {"fields": {"route": S}})
            runaway.call("PATCH", T2, {"fields": {"route": S}})
            for i in range(5):
                assert scanner.call("POST", T1 + "/increment", INC,
                                    headers=_key(f"scan-{i}")).status == 202
            for i in range(500):
                assert runaway.call("POST", T2 + "/increment", INC,
                                    headers=_key(f"r-{i}")).status == 202
                assert _held(agent) <= 20
            assert _attempts(scanner, T1) == 5
            for i in range(5):
                again = scanner.call("POST", T1 + "/increment", INC, headers=_key(f"scan-{i}"))
                assert again.headers.get("idempotent-replayed") == "true", i
            assert _attempts(scanner, T1) == 5
            newest = runaway.call("POST", T2 + "/increment", INC, headers=_key("r-499"))
            assert newest.headers.get("idempotent-replayed") == "true"
            oldest = runaway.call("POST", T2 + "/increment", INC, headers=_key("r-0"))
            assert "idempotent-replayed" not in oldest.headers
            assert _held(agent) == 20
            assert _index_sizes(agent) == (20, 20, {"scanner": 5, "app": 15})
        finally:
            scanner.close()


def test_two_busy_apps_share_the_bound_evenly(cfg: AgentConfig, catalog: Catalog) -> None:
    """Two apps sending keys in turn, one three times as fast: each ends with half."""
    with _api(cfg, catalog, idempotency_max_keys=20) as (server, agent, fast):
        assert server.socket_path is not None
        slow = Client(server.socket_path, issue(Path(cfg.data_dir), app="scanner"))
        try:
            fast.call("PATCH", T1, {"fields": {"route": S}})
            for i in range(120):
                fast.call("POST", T1 + "/increment", INC, headers=_key(f"f-{i}"))
                if i % 3 == 0:
                    slow.call("POST", T1 + "/increment", INC, headers=_key(f"s-{i}"))
            assert _index_sizes(agent) == (20, 20, {"scanner": 10, "app": 10})
            for i in range(90, 120, 3):  # the slow app's last 10 still replay
                again = slow.call("POST", T1 + "/increment", INC, headers=_key(f"s-{i}"))
                assert again.headers.get("idempotent-replayed") == "true", i
        finally:
            slow.close()


def test_records_without_an_app_tag_go_by_age(cfg: AgentConfig, catalog: Catalog) -> None:
    """A store written before the fair bound holds records without an app tag: they are
    pruned oldest first like the rest, and the bound holds."""
    with _api(cfg, catalog, idempotency_max_keys=10) as (_, agent, client):
        client.call("PATCH", T1, {"fields": {"route": S}})
        for i in range(8):
            client.call("POST", T1 + "/increment", INC, headers=_key(f"old-{i}"))
        agent._core.write(_untag)  # as an earlier release wrote them
        assert _index_sizes(agent) == (8, 0, {})
        for i in range(30):
            client.call("POST", T1 + "/increment", INC, headers=_key(f"new-{i}"))
            assert _held(agent) <= 10
        assert _held(agent) == 10
        assert _index_sizes(agent) == (10, 10, {"app": 10})
        old = client.call("POST", T1 + "/increment", INC, headers=_key("old-7"))
        assert "idempotent-replayed" not in old.headers


def _untag(work: Work) -> None:
    for dk, doc in list(work.tx.items(idempotency.DB)):
        doc.pop("g")
        work.tx.put(idempotency.DB, dk, doc)
    work.tx.clear(idempotency.APP_DB)
    work.tx.clear(idempotency.COUNT_DB)


def _index_sizes(agent: Agent) -> tuple[int, int, dict[str, int]]:
    """(time entries, app entries, keys held per app by name), checked against each
    other: every app entry has its record and the counts match the entries."""
    def read(work: Work) -> tuple[int, int, dict[str, int]]:
        tags = {idempotency.Once(scope=name, key="k", method="", path="", body="",
                                 answer=lambda r: (0, r)).app_tag: name
                for name in ("app", "scanner")}
        entries: dict[str, int] = {}
        for key in work.tx.keys(idempotency.APP_DB):
            assert work.tx.get(idempotency.DB, key[16:])["g"] == key[:8].hex()
            entries[tags[key[:8]]] = entries.get(tags[key[:8]], 0) + 1
        with work.tx.cursor(idempotency.COUNT_DB) as cur:
            counts = {tags[k]: int.from_bytes(v, "big") for k, v in cur}
        assert counts == entries
        return (work.tx.count(idempotency.TIME_DB), work.tx.count(idempotency.APP_DB),
                counts)
    return agent._read(read)
