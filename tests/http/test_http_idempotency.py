"""Idempotency-Key on the local API's writes (agent.idempotency, agent.http.idempotency):
a write sent again with its key is applied once, across restarts, and the first answer
is replayed; the key records stay bounded whatever an app sends."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest

from agent import idempotency
from agent.api import Agent
from agent.http.server import ApiServer
from schemas import wire
from schemas.collection import Catalog
from tests.agent.agentkit import rec
from tests.http.httpkit import Client, Reply, issue, running_api
from waystation.config import AgentConfig

S = "route-42"
T1 = "/v1/collections/tasks/records/t-1"
INC = {"field": "attempts", "amount": 1}


def _key(value: str) -> dict[str, str]:
    return {"Idempotency-Key": value}


def _changes(agent: Agent, op_field: str = "i") -> list[dict[str, Any]]:
    return [e["ch"] for e in agent.pending() if e["ch"].get(op_field)]


def _held(agent: Agent) -> int:
    return int(agent._read(idempotency.count))


def _same_answer(first: Reply, again: Reply) -> None:
    assert (again.status, again.body) == (first.status, first.body)
    assert again.headers.get("idempotent-replayed") == "true"
    assert "idempotent-replayed" not in first.headers


@contextmanager
def _api(cfg: AgentConfig, catalog: Catalog, clock: list[int] | None = None,
         **api: Any) -> Iterator[tuple[ApiServer, Agent, Client]]:
    """The API on `cfg` with `api` settings, on an agent whose wall clock is `clock[0]`."""
    cfg = cfg.model_copy(update={"api": cfg.api.model_copy(update=api)})
    now = None if clock is None else (lambda: clock[0])
    agent = Agent.open(cfg, catalog, now_ms=now)
    try:
        with running_api(cfg, catalog, agent=agent) as (server, _):
            assert server.socket_path is not None
            client = Client(server.socket_path, issue(Path(cfg.data_dir)))
            try:
                yield server, agent, client
            finally:
                client.close()
    finally:
        agent.close()


def test_a_retried_increment_is_applied_once(client: Client,
                                             api: tuple[ApiServer, Agent]) -> None:
    """The same increment sent again with its key: the first answer, no second change."""
    _, agent = api
    assert client.call("PATCH", T1, {"fields": {"route": S}}).status == 202
    first = client.call("POST", T1 + "/increment", INC, headers=_key("inc-1"))
    assert first.status == 202 and first.body["change_id"] == "van-1:2"
    again = client.call("POST", T1 + "/increment", INC, headers=_key("inc-1"))
    _same_answer(first, again)
    assert len(_changes(agent)) == 1
    record = agent.get("tasks", "t-1")
    assert record is not None and record.fields["attempts"] == 1
    # Without a key, or with another one, it is a new write (as before).
    assert client.call("POST", T1 + "/increment", INC).status == 202
    assert client.call("POST", T1 + "/increment", INC, headers=_key("inc-2")).status == 202
    assert len(_changes(agent)) == 3


def test_every_write_route_replays(client: Client, api: tuple[ApiServer, Agent]) -> None:
    """PATCH, add, remove, DELETE, resolve, dead-letter retry and discard: each sent
    twice with its key is one write, answered twice alike."""
    _, agent = api
    cands = [{"v": "Dock 4", "by": "van-7", "h": "0190000000010000:van-7"}]
    agent.sync.apply_delta(wire.Delta(d=[rec("t-5", 1, {"route": S, "address": "Gate 1"},
                                             cf={"address": cands})]))
    calls: list[tuple[str, str, Any]] = [
        ("PATCH", T1, {"fields": {"route": S, "status": "out"}}),
        ("POST", T1 + "/add", {"field": "labels", "members": ["a"]}),
        ("POST", T1 + "/remove", {"field": "labels", "members": ["a"]}),
        ("POST", "/v1/collections/tasks/records/t-5/fields/address/resolve",
         {"value": "Dock 4"}),
        ("DELETE", T1, None),
    ]
    for i, (method, target, body) in enumerate(calls):
        first = client.call(method, target, body, headers=_key(f"k-{i}"))
        assert first.status == 202, (target, first.body)
        before = agent.pending()
        _same_answer(first, client.call(method, target, body, headers=_key(f"k-{i}")))
        assert agent.pending() == before, target
    agent.sync.apply_reject(wire.Reject(rj=[
        wire.Rejection(n=1, code="rule_rejected", reason="r", perm=True),
        wire.Rejection(n=2, code="rule_rejected", reason="r", perm=True)]))
    first = client.call("POST", "/v1/deadletters/1/retry", headers=_key("dl-1"))
    assert first.status == 202, first.body
    # The dead letter is gone now: without the key the retry would be 404.
    _same_answer(first, client.call("POST", "/v1/deadletters/1/retry", headers=_key("dl-1")))
    first = client.call("DELETE", "/v1/deadletters/2", headers=_key("dl-2"))
    assert first.status == 200
    _same_answer(first, client.call("DELETE", "/v1/deadletters/2", headers=_key("dl-2")))
    assert client.call("DELETE", "/v1/deadletters/2").status == 404


def test_a_retried_transaction_is_applied_once(client: Client,
                                               api: tuple[ApiServer, Agent]) -> None:
    """POST /v1/txn sent again with its key moves the stock once."""
    _, agent = api
    bins = [{"op": "put", "collection": "inventory", "key": b,
             "fields": {"depot": "depot-7", "sku": "A"}} for b in ("bin-a", "bin-b")]
    assert client.call("POST", "/v1/txn", {"ops": bins}).status == 202
    move = {"ops": [{"op": "increment", "collection": "inventory", "key": "bin-a",
                     "field": "stock", "amount": -2},
                    {"op": "increment", "collection": "inventory", "key": "bin-b",
                     "field": "stock", "amount": 2}]}
    first = client.call("POST", "/v1/txn", move, headers=_key("move-1"))
    assert first.status == 202 and len(first.body["change_ids"]) == 2
    _same_answer(first, client.call("POST", "/v1/txn", move, headers=_key("move-1")))
    assert len(_changes(agent)) == 2
    a = agent.get("inventory", "bin-a")
    assert a is not None and a.fields["stock"] == -2


def test_a_large_answer_is_replayed_whole_and_stored_small(
        client: Client, api: tuple[ApiServer, Agent]) -> None:
    """A 100-operation transaction's answer (~22 KB) is replayed byte for byte; its
    record takes a fraction of that (compressed)."""
    _, agent = api
    ops = [{"op": "put", "collection": "tasks", "key": f"o-{i:03d}",
            "fields": {"route": S, "status": "ordered"}} for i in range(100)]
    first = client.call("POST", "/v1/txn", {"ops": ops}, headers=_key("big"))
    assert first.status == 202 and len(orjson.dumps(first.body)) > 20_000
    _same_answer(first, client.call("POST", "/v1/txn", {"ops": ops}, headers=_key("big")))
    assert len(agent.pending()) == 100
    sizes = agent._read(lambda work: [len(v) for _, v in work.tx.cursor(idempotency.DB)])
    assert sizes and max(sizes) < 5_000


def test_the_answer_is_replayed_after_a_restart(cfg: AgentConfig, catalog: Catalog) -> None:
    """The key is in the store with its write: a new agent process replays it."""
    with _api(cfg, catalog) as (_, _agent, client):
        client.call("PATCH", T1, {"fields": {"route": S}})
        first = client.call("POST", T1 + "/increment", INC, headers=_key("r-1"))
        assert first.status == 202
    with _api(cfg, catalog) as (_, agent, client):
        _same_answer(first, client.call("POST", T1 + "/increment", INC, headers=_key("r-1")))
        assert len(_changes(agent)) == 1


def test_a_key_reused_for_another_request_is_refused(client: Client,
                                                     api: tuple[ApiServer, Agent]) -> None:
    """Same key, another body or path: 422 idempotency_key_reused naming what differs."""
    _, agent = api
    client.call("PATCH", T1, {"fields": {"route": S}})
    assert client.call("POST", T1 + "/increment", INC, headers=_key("u-1")).status == 202
    r = client.call("POST", T1 + "/increment", {"field": "attempts", "amount": 5},
                    headers=_key("u-1"))
    assert (r.status, r.body["code"]) == (422, "idempotency_key_reused"), r.body
    assert "its body differs" in r.body["message"] and "POST /v1/" in r.body["message"]
    r = client.call("PATCH", "/v1/collections/tasks/records/t-2", {"fields": {"route": S}},
                    headers=_key("u-1"))
    assert r.status == 422 and "method and path and body differ" in r.body["message"]
    r = client.call("POST", "/v1/txn", {"ops": [{"op": "delete", "collection": "tasks",
                                                "key": "t-1"}]}, headers=_key("u-1"))
    assert r.status == 422 and r.body["code"] == "idempotency_key_reused"
    assert len(_changes(agent)) == 1 and agent.get("tasks", "t-1") is not None
    # Another app's key of the same name is another key.
    other = Client(api[0].socket_path or Path(), issue(Path(agent.store.path).parent, "other"))
    try:
        assert other.call("POST", T1 + "/increment", INC, headers=_key("u-1")).status == 202
    finally:
        other.close()


def test_a_refused_write_records_nothing_and_may_be_retried(
        client: Client, api: tuple[ApiServer, Agent]) -> None:
    """A write refused (422 at the commit, or bad input) keeps no key: the same request
    once the record exists, or a corrected body, is written."""
    _, agent = api
    r = client.call("DELETE", T1, headers=_key("d-1"))
    assert (r.status, r.body["code"]) == (422, "invalid"), r.body
    r = client.call("POST", T1 + "/increment", {"field": "nope", "amount": 1},
                    headers=_key("i-1"))
    assert r.status == 422 and r.body["code"] == "unknown_field"
    assert _held(agent) == 0
    client.call("PATCH", T1, {"fields": {"route": S}})
    r = client.call("DELETE", T1, headers=_key("d-1"))
    assert r.status == 202 and "idempotent-replayed" not in r.headers
    r = client.call("POST", "/v1/collections/tasks/records/t-2/increment", INC,
                    headers=_key("i-1"))
    assert r.status == 422 and r.body["code"] == "invalid"  # no scope field: still none
    assert _held(agent) == 1


def _raw_status(path: Path, token: str | None, method: str, target: str, body: bytes,
                headers: dict[str, str]) -> int:
    """The status of one request written in a single send on a new Unix-socket connection."""
    head = [f"{method} {target} HTTP/1.1", "Host: agent", "Content-Type: application/json",
            f"Content-Length: {len(body)}", "Connection: close"]
    if token is not None:
        head.append(f"Authorization: Bearer {token}")
    head += [f"{k}: {v}" for k, v in headers.items()]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1])


def test_invalid_keys_are_refused(client: Client, api: tuple[ApiServer, Agent]) -> None:
    """Empty, too long, control or non-ASCII characters, two headers: 422, no write."""
    _, agent = api
    client.call("PATCH", T1, {"fields": {"route": S}})
    for bad in ("", "k" * 201, "tab\there", "caf\u00e9"):
        r = client.call("POST", T1 + "/increment", INC, headers=_key(bad))
        assert (r.status, r.body["code"]) == (422, "invalid_idempotency_key"), (bad, r.body)
    # Other control characters are refused by the HTTP parser before the API sees them.
    # (The parser closes the connection after its 400: a new one for each, and the
    # request goes in one send: http.client sends the body after the head, into a
    # connection the parser may have closed already.)
    for bad in ("a\x01b", "del\x7f"):
        assert _raw_status(api[0].socket_path or Path(), client.token, "POST",
                           T1 + "/increment", orjson.dumps(INC), _key(bad)) == 400
    assert client.call("POST", T1 + "/increment", INC,
                       headers=_key("k" * 200)).status == 202
    client.conn.putrequest("POST", T1 + "/increment")
    for name, value in (("Authorization", f"Bearer {client.token}"),
                        ("Content-Type", "application/json"), ("Idempotency-Key", "x"),
                        ("Idempotency-Key", "y")):
        client.conn.putheader(name, value)
    body = orjson.dumps(INC)
    client.conn.putheader("Content-Length", str(len(body)))
    client.conn.endheaders(body)
    resp = client.conn.getresponse()
    assert resp.status == 422 and b"invalid_idempotency_key" in resp.read()
    assert len(_changes(agent)) == 1


def test_keys_expire_after_keep_s(cfg: AgentConfig, catalog: Catalog) -> None:
    """Past api.idempotency_keep_s the key is forgotten: the same request writes again,
    and the old record is pruned by later writes."""
    clock = [1_800_000_000_000]
    with _api(cfg, catalog, clock, idempotency_keep_s=60.0) as (_, agent, client):
        client.call("PATCH", T1, {"fields": {"route": S}})
        first = client.call("POST", T1 + "/increment", INC, headers=_key("e-1"))
        clock[0] += 59_000
        _same_answer(first, client.call("POST", T1 + "/increment", INC, headers=_key("e-1")))
        clock[0] += 2_000
        client.call("POST", T1 + "/increment", INC, headers=_key("e-2"))  # prunes e-1
        assert _held(agent) == 1
        again = client.call("POST", T1 + "/increment", INC, headers=_key("e-1"))
        assert again.status == 202 and "idempotent-replayed" not in again.headers
        assert len(_changes(agent)) == 3


def test_at_most_max_keys_are_kept(cfg: AgentConfig, catalog: Catalog) -> None:
    """Thousands of distinct keys leave at most api.idempotency_max_keys records: the
    oldest go first, the newest still replay."""
    with _api(cfg, catalog, idempotency_max_keys=20) as (_, agent, client):
        client.call("PATCH", T1, {"fields": {"route": S}})
        for i in range(2000):
            r = client.call("POST", T1 + "/increment", INC, headers=_key(f"m-{i}"))
            assert r.status == 202
            assert _held(agent) <= 20
        assert _held(agent) == 20
        newest = client.call("POST", T1 + "/increment", INC, headers=_key("m-1999"))
        assert newest.headers.get("idempotent-replayed") == "true"
        oldest = client.call("POST", T1 + "/increment", INC, headers=_key("m-0"))
        assert "idempotent-replayed" not in oldest.headers
        assert _held(agent) == 20
        held_t = agent._read(lambda work: sum(1 for _ in work.tx.keys(idempotency.TIME_DB)))
        assert held_t == 20


def test_two_requests_with_one_key_at_once_write_once(
        api: tuple[ApiServer, Agent], token: str) -> None:
    """Sent in parallel on two connections: one write; both get its answer."""
    server, agent = api
    assert server.socket_path is not None
    path = server.socket_path
    setup = Client(path, token)
    setup.call("PATCH", T1, {"fields": {"route": S}})
    setup.close()
    for round_ in range(10):
        gate = threading.Barrier(2)
        replies: list[Reply] = []
        threads = [threading.Thread(target=_send, args=(path, token, f"p-{round_}", gate,
                                                        replies)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert [(r.status, r.body) for r in replies] == [(replies[0].status,
                                                           replies[0].body)] * 2
        assert replies[0].status == 202
        assert sum(r.headers.get("idempotent-replayed") == "true" for r in replies) == 1
    assert len(_changes(agent)) == 10


def _send(path: Path, token: str, key: str, gate: threading.Barrier,
          replies: list[Reply]) -> None:
    c = Client(path, token)
    try:
        gate.wait(10)
        replies.append(c.call("POST", T1 + "/increment", INC, headers=_key(key)))
    finally:
        c.close()


@pytest.mark.parametrize("encrypted", [False, True])
def test_key_records_are_sealed_on_an_encrypted_store(
        short_dir: Path, catalog: Catalog, encrypted: bool) -> None:
    """The answer stored with a key is sealed like the records it names."""
    from tests.agent.atrest_kit import cfg_for

    key_file = None
    if encrypted:
        key_file = short_dir / "store.key"
        key_file.write_bytes(bytes(range(32)))
        key_file.chmod(0o600)
    cfg = cfg_for(short_dir / "data", key_file)
    marker = "marker-record-0815"
    with _api(cfg, catalog) as (_, agent, client):
        r = client.call("PATCH", f"/v1/collections/tasks/records/{marker}",
                        {"fields": {"route": S}}, headers=_key("s-1"))
        assert r.status == 202
        assert _held(agent) == 1
        found: list[bytes] = []

        def raw(work: Any) -> None:
            with work.tx.cursor(idempotency.DB) as cur:
                found.extend(bytes(v) for _, v in cur)

        agent._read(raw)
    assert (marker.encode() in found[0]) is not encrypted
