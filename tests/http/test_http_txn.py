"""Transactions over the local API (POST /v1/txn): all or none, and what wrong or
hostile input gets (a clear 4xx, nothing written, bounded work)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from agent.api import Agent
from agent.http.server import ApiServer
from agent.http.txn_routes import TxnOut
from agent.transaction import MAX_TXN_OPS
from tests.http.httpkit import Client, issue

BINS = [{"op": "put", "collection": "inventory", "key": b, "fields": {"depot": "depot-7",
                                                                      "sku": "A"}}
        for b in ("bin-a", "bin-b")]


def _move(amount: int) -> list[dict[str, Any]]:
    return [{"op": "increment", "collection": "inventory", "key": "bin-a", "field": "stock",
             "amount": -amount},
            {"op": "increment", "collection": "inventory", "key": "bin-b", "field": "stock",
             "amount": amount}]


def _stock(client: Client, key: str) -> int:
    reply = client.call("GET", f"/v1/collections/inventory/records/{key}")
    assert reply.status == 200
    return int(reply.body["fields"].get("stock", 0))


def test_one_call_writes_an_order_and_moves_stock(client: Client,
                                                  api: tuple[ApiServer, Agent]) -> None:
    _, agent = api
    setup = client.call("POST", "/v1/txn", {"ops": BINS})
    assert setup.status == 202, setup.body
    ops = [{"op": "put", "collection": "tasks", "key": "o-1",
            "fields": {"route": "route-42", "status": "ordered"}},
           {"op": "add", "collection": "tasks", "key": "o-1", "field": "labels",
            "members": ["urgent"]},
           *_move(3)]
    reply = client.call("POST", "/v1/txn", {"ops": ops, "priority": 2})
    assert reply.status == 202, reply.body
    TxnOut.model_validate(reply.body)
    assert reply.body["change_ids"] == ["van-1:3", "van-1:4", "van-1:5", "van-1:6"]
    assert reply.body["message"] == ("saved locally as one transaction (changes van-1:3 to "
                                      "van-1:6), pending sync")
    assert [r["state"] for r in reply.body["results"]] == ["pending"] * 4
    assert _stock(client, "bin-a") == -3 and _stock(client, "bin-b") == 3
    entries = {e["ch"]["n"]: e for e in agent.pending()}
    assert all(entries[n]["x"] == [3, 4] and entries[n]["p"] == 2 for n in range(3, 7))
    assert entries[1]["x"] == [1, 2]


def test_a_refused_operation_writes_nothing_and_names_its_index(
        client: Client, api: tuple[ApiServer, Agent]) -> None:
    _, agent = api
    assert client.call("POST", "/v1/txn", {"ops": BINS}).status == 202
    before = agent.pending()
    cases: list[tuple[dict[str, Any], int, str, str]] = [
        # refused when recorded (input the schema rejects)
        ({"ops": [*_move(1), {"op": "put", "collection": "tasks", "key": "o-1",
                              "fields": {"nope": 1}}]}, 422, "unknown_field", "ops.2:"),
        ({"ops": [*_move(1), {"op": "put", "collection": "nope", "key": "k",
                              "fields": {"a": 1}}]}, 422, "unknown_collection", "ops.2:"),
        # refused at the commit (the record does not exist)
        ({"ops": [*_move(1), {"op": "delete", "collection": "tasks", "key": "missing"}]},
         422, "invalid", "ops.2:"),
    ]
    for body, status, code, where in cases:
        reply = client.call("POST", "/v1/txn", body)
        assert (reply.status, reply.body["code"]) == (status, code), reply.body
        assert reply.body["message"].startswith(where), reply.body
        assert reply.body["message"].endswith("nothing was written")
    assert agent.pending() == before
    assert _stock(client, "bin-a") == 0


def test_wrong_and_hostile_bodies(client: Client, api: tuple[ApiServer, Agent]) -> None:
    _, agent = api
    one = {"op": "increment", "collection": "inventory", "key": "bin-a", "field": "stock",
           "amount": 1}
    cases: list[tuple[Any, int, str]] = [
        ({}, 422, "invalid"),
        ({"ops": []}, 422, "invalid"),
        ({"ops": "put"}, 422, "invalid"),
        ({"ops": [{"op": "drop_table", "collection": "tasks", "key": "k"}]}, 422, "invalid"),
        ({"ops": [{**one, "amount": "1"}]}, 422, "invalid"),
        ({"ops": [{**one, "extra": True}]}, 422, "invalid"),
        ({"ops": [{**one, "key": ""}]}, 422, "invalid"),
        ({"ops": [{**one, "amount": 0}]}, 422, "invalid_increment"),
        ({"ops": [one], "priority": 10**9}, 422, "invalid"),
        ({"ops": [one] * (MAX_TXN_OPS + 1)}, 422, "invalid"),
        ([one], 422, "invalid"),
    ]
    for body, status, code in cases:
        reply = client.call("POST", "/v1/txn", body)
        assert reply.status == status, (body, reply.body)
        assert reply.body["code"].startswith(code.split("_")[0]), (body, reply.body)
        assert reply.body["message"]
    assert client.call("POST", "/v1/txn", raw=b"{not json").body["code"] == "bad_json"
    reply = client.call("POST", "/v1/txn", {"ops": [one]}, headers={"Content-Type":
                                                                     "text/plain"})
    assert reply.status == 415
    # A body over api.max_body_bytes is refused before it is read.
    huge = orjson.dumps({"ops": [{**one, "key": "k" * 150}] * 20_000})
    reply = client.call("POST", "/v1/txn", raw=huge)
    assert reply.status == 413 and reply.body["code"] == "body_too_large"
    # Changes over the transaction's byte limit: refused whole.
    big = {"photo": "x" * 50_000}
    ops = [{"op": "put", "collection": "tasks", "key": f"big-{i}",
            "fields": {"route": "route-42", "proof": big}} for i in range(3)]
    reply = client.call("POST", "/v1/txn", {"ops": ops})
    assert reply.status == 422 and reply.body["code"] == "transaction_too_large", reply.body
    assert agent.pending() == []


def test_write_right_is_needed_on_every_collection(
        client: Client, api: tuple[ApiServer, Agent], cfg: Any) -> None:
    server, agent = api
    token = issue(Path(cfg.data_dir), "scanner", read=("*",), write=("tasks",))
    assert server.socket_path is not None
    scanner = Client(server.socket_path, token)
    try:
        ops = [{"op": "put", "collection": "tasks", "key": "o-1",
                "fields": {"route": "route-42"}}, *_move(1)]
        reply = scanner.call("POST", "/v1/txn", {"ops": ops})
        assert reply.status == 403 and "inventory" in reply.body["message"]
        assert agent.pending() == []
    finally:
        scanner.close()
