"""The OpenAPI document: committed and current, and the running API fuzzed against it."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.specs.openapi.checks import positive_data_acceptance

from agent.errors import WriteRefused
from agent.http import openapi
from agent.validate import record_key
from schemas.collection import Catalog, CollectionSpec, example_catalog_path, load_catalog
from tests.agent.agentkit import make_cfg
from tests.helpers import free_port
from tests.http.httpkit import issue, running_api


def test_committed_openapi_document_is_current() -> None:
    """docs/agent-api.openapi.json equals what the code generates (else regenerate it)."""
    assert openapi.DOC_PATH.read_text() == openapi.render(), (
        "stale: run .venv/bin/python -m agent.http.openapi")


def test_every_route_is_documented() -> None:
    """Every route of the table is in the document, with its error answers."""
    doc = openapi.build()
    from agent.http.routes import ROUTES

    for route in ROUTES:
        op = doc["paths"][route.path][route.method.lower()]
        assert "401" in op["responses"]
    assert doc["openapi"] == "3.1.0"


@functools.cache
def _key_param() -> tuple[CollectionSpec, dict[str, Any], re.Pattern[str]]:
    """The example's `tasks` spec and the document's key parameter, built once (building
    them per example took Hypothesis past its deadline on a loaded machine)."""
    spec = load_catalog(example_catalog_path()).collections["tasks"]
    (param,) = [p for p in openapi.build()["paths"][
        "/v1/collections/{collection}/records/{key}"]["get"]["parameters"]
        if p["name"] == "key"]
    return spec, param, re.compile(param["schema"]["pattern"])


@given(st.text(min_size=1, max_size=200))
def test_the_documented_key_pattern_admits_every_key_the_agent_takes(key: str) -> None:
    """A generated client validates path parameters against the document: a key the
    agent stores must match it (the old printable-ASCII pattern refused 'Bäckerei')."""
    spec, param, pattern = _key_param()
    try:
        record_key(spec, key)
    except WriteRefused:
        return
    assert pattern.search(key) and len(key) <= param["schema"]["maxLength"], key


def test_the_documented_key_pattern_refuses_control_characters() -> None:
    (param,) = [p for p in openapi.build()["paths"][
        "/v1/collections/{collection}/records/{key}"]["get"]["parameters"]
        if p["name"] == "key"]
    pattern = re.compile(param["schema"]["pattern"])
    assert pattern.search("Bäckerei-東京-1") and pattern.search("a b~")
    assert not pattern.search("a\nb") and not pattern.search("\x1b[2J")


schema = schemathesis.openapi.from_path(openapi.DOC_PATH).exclude(
    path_regex="^/v1/(feed|events)$")


@pytest.fixture(scope="module")
def live_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    catalog: Catalog = load_catalog(example_catalog_path())
    root = tmp_path_factory.mktemp("fuzz")
    cfg = make_cfg(root / "data")
    cfg = cfg.model_copy(update={"api": cfg.api.model_copy(update={"socket": False})})
    port = free_port()
    token = issue(Path(cfg.data_dir))
    with running_api(cfg, catalog, tcp_port=port) as (_, agent):
        agent.put("tasks", "t-1", {"route": "route-42", "address": "a"})
        yield {"base_url": f"http://127.0.0.1:{port}", "token": token}


@schema.parametrize()
@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                 HealthCheck.function_scoped_fixture])
def test_fuzz_the_running_api(case: Any, live_api: dict[str, Any]) -> None:
    """Generated requests (valid and not) never get a 5xx, and every answer matches the
    document (status codes, content types, JSON schemas). Not checked: that every
    schema-valid request is accepted — which fields and collections exist is the
    operator's collection schema, not the API document's."""
    case.call_and_validate(base_url=live_api["base_url"],
                           headers={"Authorization": f"Bearer {live_api['token']}"},
                           excluded_checks=[positive_data_acceptance])
