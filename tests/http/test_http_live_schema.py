"""A live query open over the local API while the device takes a schema version that
renames the field it filters on (docs/agent-api.md, "When the schema changes under a
running app"): the stream ends with an `error` event naming the field and the version
the device now runs, not with a silent close the app cannot tell from a lost link."""

from __future__ import annotations

import tomllib
import urllib.parse
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from agent.api import Agent
from agent.http.server import ApiServer
from schemas import wire
from schemas.collection import parse_catalog
from tests.agent.agentkit import rec
from tests.http.httpkit import running_api
from tests.http.test_http_query import LiveSse
from tests.schema_versions import V2, V3
from waystation.config import AgentConfig

# Versions 2 and 3 of the test schema with `tasks.notes` (3: `note`, renamed) indexed.
A2 = V2.replace('"customer"]', '"customer", "notes"]')
A3 = V3.replace('"customer"]', '"customer", "note"]')


@pytest.fixture
def api_v2(cfg: AgentConfig) -> Iterator[tuple[ApiServer, Agent]]:
    with running_api(cfg, parse_catalog(tomllib.loads(A2), "v2")) as pair:
        yield pair


def _events(live: LiveSse) -> Iterator[tuple[bytes, dict[str, Any]]]:
    while True:
        fields, doc = live.next_event()
        yield fields[b"event"], doc


def test_live_query_on_a_renamed_field_ends_with_an_error_naming_the_version(
        api_v2: tuple[ApiServer, Agent], token: str) -> None:
    server, agent = api_v2
    assert server.socket_path is not None
    agent.sync.apply_delta(wire.Delta(d=[rec("t-1", 1, {"route": "r1", "notes": "gate"})]))
    agent.sync.apply_welcome(wire.Welcome(caps=["schema", "schema_push"], sv=3, sv_min=1))
    q = urllib.parse.quote(orjson.dumps({"where": {"notes": "gate"}}))
    live = LiveSse(server.socket_path, token, f"/v1/collections/tasks/live?q={q}")
    try:
        assert live.status == 200
        events = _events(live)
        kind, first = next(events)
        assert kind == b"result" and first["keys"] == ["t-1"]
        taken = agent.sync.take_schema(wire.SchemaPush(sv=3, text=A3))
        assert taken is not None and taken.changed
        kind, doc = next(events)
        assert kind == b"error", doc
        assert doc["status"] == 422 and doc["code"] == "unknown_field"
        assert "'notes'" in doc["message"] and "schema version 3" in doc["message"]
        with pytest.raises(ConnectionError):  # and the stream ends
            next(events)
    finally:
        live.close()
