"""Wrong and hostile input to the local API: clear JSON errors, nothing stored, no growth."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from agent.api import Agent
from agent.http.server import ApiServer
from tests.http.httpkit import Client, issue
from waystation.config import AgentConfig

S = "route-42"
T1 = "/v1/collections/tasks/records/t-1"


def _error(r: object, status: int, code: str) -> None:
    body = r.body  # type: ignore[attr-defined]
    assert r.status == status, body  # type: ignore[attr-defined]
    assert body["status"] == status and body["code"] == code and body["message"], body


@pytest.mark.parametrize(("method", "target", "body", "status", "code"), [
    ("GET", "/nope", None, 404, "not_found"),
    ("GET", "/v1/collections/tasks/records/t-1/x/y/z", None, 404, "not_found"),
    ("PUT", T1, {"fields": {"route": S}}, 405, "method_not_allowed"),
    ("PATCH", T1, {"fields": {}}, 422, "invalid"),
    ("PATCH", T1, {"fields": {"route": 42}}, 422, "type_mismatch"),
    ("PATCH", T1, {"fields": {"route": S, "nope": 1}}, 422, "unknown_field"),
    ("PATCH", T1, {"fields": {"route": "route-9"}}, 422, "scope_denied"),
    ("PATCH", T1, {"fields": {"route": S}, "extra": 1}, 422, "invalid"),
    ("PATCH", T1, {"fields": {"route": S}, "priority": "high"}, 422, "invalid"),
    ("PATCH", T1, [1, 2], 422, "invalid"),
    ("PATCH", "/v1/collections/nope/records/k", {"fields": {"a": 1}}, 404,
     "unknown_collection"),
    ("GET", "/v1/collections/nope/records", None, 404, "unknown_collection"),
    ("POST", T1 + "/increment", {"field": "attempts", "amount": True}, 422, "invalid"),
    ("POST", T1 + "/increment", {"field": "status", "amount": 1}, 422, "wrong_strategy"),
    ("POST", T1 + "/add", {"field": "labels", "members": "a"}, 422, "invalid"),
    ("GET", "/v1/collections/tasks/records?limit=0", None, 422, "invalid"),
    ("GET", "/v1/collections/tasks/records?limit=abc", None, 422, "invalid"),
    ("GET", "/v1/events?since=-1", None, 422, "invalid"),
    ("GET", "/v1/events?wait_s=nan", None, 422, "invalid"),
    ("POST", "/v1/deadletters/abc/retry", None, 422, "invalid"),
    ("POST", "/v1/deadletters/7/retry", None, 404, "not_found"),
    ("DELETE", "/v1/collections/tasks/records/none", None, 422, "invalid"),
])
def test_bad_requests_get_json_errors(client: Client, api: tuple[ApiServer, Agent],
                                      method: str, target: str, body: object, status: int,
                                      code: str) -> None:
    """Each wrong request gets its status and code as JSON, and stores nothing."""
    _error(client.call(method, target, body), status, code)
    assert api[1].pending() == []


def test_bad_json_and_wrong_content_type(client: Client) -> None:
    """Malformed JSON is 400 bad_json; a body that is not JSON is 415."""
    _error(client.call("PATCH", T1, raw=b'{"fields": {"route": '), 400, "bad_json")
    _error(client.call("PATCH", T1, raw=b"\xff\xfe"), 400, "bad_json")
    _error(client.call("PATCH", T1, raw=b"route=x", headers={"Content-Type": "text/plain"}),
           415, "unsupported_media_type")


def test_huge_body_is_413_without_reading_it(client: Client) -> None:
    """A body over api.max_body_bytes is refused by its Content-Length, then by size."""
    _error(client.call("PATCH", T1, raw=b"x" * (1024 * 1024 + 1)), 413, "body_too_large")


def test_huge_chunked_body_is_413(api: tuple[ApiServer, Agent], token: str) -> None:
    """A chunked body (no Content-Length) that grows past the limit is refused too."""
    server, _ = api
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(server.socket_path))
        sock.sendall(f"PATCH {T1} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                     "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                     .encode())
        chunk = b"x" * 65536
        try:
            for _ in range(40):
                sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        except OSError:
            pass  # the server may close before we finish
        head = sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 413")


def test_record_over_the_record_limit_is_refused(client: Client) -> None:
    """A value that would make the record exceed 64 KiB is 422 record_too_large."""
    r = client.call("PATCH", T1, {"fields": {"route": S, "proof": "x" * 70_000}})
    _error(r, 422, "record_too_large")


@pytest.mark.parametrize("header", [
    None, "Bearer", "Bearer wst_00000000_" + "A" * 43, "Basic dXNlcjpwYXNz",
    "Bearer " + "x" * 5000, "bearer wst_zz_zz",
])
def test_missing_or_bad_tokens_are_401(api: tuple[ApiServer, Agent], token: str,
                                       header: str | None) -> None:
    """No token, a malformed one, an unknown one or a huge header: 401, nothing read."""
    server, _ = api
    assert server.socket_path is not None
    c = Client(server.socket_path, None)
    try:
        r = c.call("GET", "/v1/status", headers={"Authorization": header} if header else None)
        _error(r, 401, "unauthorized")
        assert "bearer" in r.headers["www-authenticate"].lower()
    finally:
        c.close()


def test_right_id_wrong_secret_is_401(api: tuple[ApiServer, Agent], token: str) -> None:
    """A token with a known id but another secret is refused (constant-time compare)."""
    server, _ = api
    forged = token[:13] + ("A" if token[13] != "A" else "B") + token[14:]
    c = Client(server.socket_path, forged)  # type: ignore[arg-type]
    try:
        _error(c.call("GET", "/v1/status"), 401, "unauthorized")
    finally:
        c.close()


def test_rights_per_collection(api: tuple[ApiServer, Agent], cfg: AgentConfig) -> None:
    """An app reads only what --read/--write name, writes only what --write names."""
    server, agent = api
    agent.put("inspections", "i-1", {"vehicle": "v"})
    tok = issue(Path(cfg.data_dir), "scanner", read=("inspections",), write=("tasks",))
    c = Client(server.socket_path, tok)  # type: ignore[arg-type]
    try:
        assert c.call("PATCH", T1, {"fields": {"route": S}}).status == 202
        assert c.call("GET", T1).status == 200  # write implies read
        assert c.call("GET", "/v1/collections/inspections/records/i-1").status == 200
        _error(c.call("PATCH", "/v1/collections/inspections/records/i-1",
                      {"fields": {"vehicle": "w"}}), 403, "forbidden")
        _error(c.call("GET", "/v1/collections/inventory/records"), 403, "forbidden")
        _error(c.call("GET", "/v1/feed?collection=inventory"), 403, "forbidden")
    finally:
        c.close()


def test_removed_token_stops_working(api: tuple[ApiServer, Agent], cfg: AgentConfig,
                                     client: Client) -> None:
    """Removing a token takes effect on the running server at the next request."""
    from agent.http.auth import TokenStore

    assert client.call("GET", "/v1/status").status == 200
    TokenStore(Path(cfg.data_dir)).remove("app")
    _error(client.call("GET", "/v1/status"), 401, "unauthorized")


def test_slow_client_does_not_block_others(api: tuple[ApiServer, Agent], client: Client,
                                           ) -> None:
    """A client that sends half a request and stalls does not stop others being served."""
    server, _ = api
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as slow:
        slow.connect(str(server.socket_path))
        slow.sendall(b"PATCH /v1/collections/tasks/records/t-1 HTTP/1.1\r\nContent-Le")
        started = time.monotonic()
        assert client.call("GET", "/v1/status").status == 200
        assert time.monotonic() - started < 10
