"""POST /v1/sync ("sync now") and the policy fields of GET /v1/status, over the socket."""

from __future__ import annotations

from pathlib import Path

from agent.api import Agent
from agent.http import models
from agent.http.server import ApiServer
from tests.http.httpkit import Client, issue
from waystation.config import AgentConfig


def test_sync_now_records_the_request(client: Client, api: tuple[ApiServer, Agent]) -> None:
    """202 with the request time; the store keeps it (a daemon started later honours
    it) and says it came from the app."""
    r = client.call("POST", "/v1/sync")
    assert r.status == 202, r.body
    out = models.SyncNowOut.model_validate(r.body)
    _, agent = api
    req = agent.sync.sync_now_request()
    assert req is not None and req["t"] == out.requested_ms and req["by"] == "app"
    assert out.deferred == []


def test_sync_now_needs_a_write_right(api: tuple[ApiServer, Agent], cfg: AgentConfig) -> None:
    """A read-only app may not ask to sync now (403 saying why); no token: 401."""
    server, agent = api
    assert server.socket_path is not None
    reader = Client(server.socket_path, issue(Path(cfg.data_dir), "viewer", ("*",), ()))
    nobody = Client(server.socket_path, None)
    try:
        r = reader.call("POST", "/v1/sync")
        assert r.status == 403 and "write" in r.body["message"]
        assert nobody.call("POST", "/v1/sync").status == 401
        assert agent.sync.sync_now_request() is None
    finally:
        reader.close()
        nobody.close()


def test_sync_now_ignores_a_body_and_rejects_other_methods(client: Client) -> None:
    """A body is not needed (ignored when present); GET on the route is 405."""
    assert client.call("POST", "/v1/sync", {"anything": 1}).status == 202
    assert client.call("GET", "/v1/sync").status == 405


def test_status_carries_the_policy_fields(client: Client) -> None:
    """GET /v1/status validates against its model with deferred, sync_now_until_ms and
    server (nothing held without a running daemon)."""
    r = client.call("GET", "/v1/status")
    status = models.StatusOut.model_validate(r.body)
    assert status.deferred == [] and status.sync_now_until_ms is None
