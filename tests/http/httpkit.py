"""Helpers for local API tests: a running ApiServer on a real store, a tiny HTTP client
over its Unix socket (stdlib http.client), and issued tokens."""

from __future__ import annotations

import http.client
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from agent.api import Agent
from agent.http.auth import TokenStore
from agent.http.server import ApiServer
from schemas.collection import Catalog
from waystation.config import AgentConfig


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 30.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


@dataclass
class Reply:
    status: int
    body: Any
    headers: dict[str, str]


class Client:
    """One keep-alive connection to the API's Unix socket."""

    def __init__(self, path: Path, token: str | None) -> None:
        self.conn = UnixConnection(str(path))
        self.token = token

    def call(self, method: str, target: str, body: Any = None, *, raw: bytes | None = None,
             headers: dict[str, str] | None = None) -> Reply:
        hdrs = {"Content-Type": "application/json"}
        if self.token is not None:
            hdrs["Authorization"] = f"Bearer {self.token}"
        hdrs.update(headers or {})
        data = raw if raw is not None else (None if body is None else orjson.dumps(body))
        self.conn.request(method, target, body=data, headers=hdrs)
        resp = self.conn.getresponse()
        payload = resp.read()
        ctype = resp.getheader("Content-Type", "")
        parsed = orjson.loads(payload) if payload and "json" in ctype else payload
        return Reply(resp.status, parsed, {k.lower(): v for k, v in resp.getheaders()})

    def close(self) -> None:
        self.conn.close()


@contextmanager
def running_api(cfg: AgentConfig, catalog: Catalog, *, tcp_port: int | None = None,
                agent: Agent | None = None) -> Iterator[tuple[ApiServer, Agent]]:
    own = agent is None
    ag = agent if agent is not None else Agent.open(cfg, catalog)
    server = ApiServer(cfg, ag, tcp_port=tcp_port)
    server.start()
    try:
        yield server, ag
    finally:
        server.stop()
        if own:
            ag.close()


def issue(data_dir: Path, app: str = "app", read: tuple[str, ...] = ("*",),
          write: tuple[str, ...] = ("*",)) -> str:
    token, _ = TokenStore(data_dir).add(app, read, write)
    return token
