"""How a write wakes the sync daemon: a datagram on its socket, and after a poke that
found no daemon, not again at once."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

import agent.api as api
from agent.api import WAKE_SOCKET, WAKE_SYNC_NOW, WAKE_WRITE, Agent
from schemas.collection import Catalog
from tests.agent.agentkit import make_cfg


def _listen(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    return sock


def test_after_a_poke_found_no_daemon_the_next_ones_wait(tmp_path: Path, catalog: Catalog,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    monkeypatch.setattr(api, "_POKE_RETRY_S", 0.2)
    with Agent.open(make_cfg(tmp_path / "d"), catalog) as ag:
        ag.put("tasks", "t-1", {"route": "route-42"})  # nobody listens: quiet from now
        sock = _listen(ag.store.path / WAKE_SOCKET)
        try:
            ag.put("tasks", "t-2", {"route": "route-42"})
            with pytest.raises(BlockingIOError):
                sock.recv(64)
            time.sleep(0.25)  # the quiet period is over
            ag.put("tasks", "t-3", {"route": "route-42"})
            assert sock.recv(64) == WAKE_WRITE
            ag.sync_now()
            assert sock.recv(64) == WAKE_SYNC_NOW
        finally:
            sock.close()


def test_sync_now_always_tries_the_socket(tmp_path: Path, catalog: Catalog,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api, "_POKE_RETRY_S", 60.0)
    with Agent.open(make_cfg(tmp_path / "d"), catalog) as ag:
        ag.put("tasks", "t-1", {"route": "route-42"})  # no daemon: quiet for a minute
        sock = _listen(ag.store.path / WAKE_SOCKET)
        try:
            ag.sync_now()
            assert sock.recv(64) == WAKE_SYNC_NOW
        finally:
            sock.close()
