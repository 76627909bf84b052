"""`waystation demo`: the whole system on one machine, run as a user would run it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from agent.api import Agent
from broker.server.store.lmdb_store import LmdbStore
from schemas.collection import example_catalog_path, load_catalog
from tests.e2e.fleet import waystation_argv
from waystation.config import AgentConfig
from waystation.convergence import compare

pytestmark = pytest.mark.e2e

DEVICES = {"van-1": ("route-42", "depot-7", "fleet"), "van-2": ("route-42", "depot-7", "fleet"),
           "scanner-1": ("depot-7", "fleet")}


def run_demo(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(waystation_argv("demo", *args), cwd=cwd, capture_output=True,
                          text=True, timeout=300, check=False)


def test_demo_converges(tmp_path: Path) -> None:
    """`waystation demo` exits 0 and says that every device converged."""
    result = run_demo(cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "all devices converged" in out
    assert "FAILED" not in out and "MISMATCH" not in out
    for dev in DEVICES:
        assert f"{dev}" in out and "identical to the server" in out
    assert list(tmp_path.iterdir()) == []  # its temporary data went away


def test_demo_keeps_its_stores_in_data_dir(tmp_path: Path) -> None:
    """`demo --data-dir DIR` leaves the broker, server and device stores in DIR, converged."""
    data = tmp_path / "demo"
    result = run_demo("--data-dir", str(data), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all devices converged" in result.stdout
    assert str(data) in result.stdout
    assert (data / "broker" / "passwd").is_file()
    assert (data / "server" / "store" / "data.mdb").is_file()
    catalog = load_catalog(example_catalog_path())
    with LmdbStore(data / "server") as store:
        assert store.info().counts["records"] > 0
        for dev, scopes in DEVICES.items():
            assert (data / dev / "agent.lmdb" / "data.mdb").is_file()
            cfg = AgentConfig.model_validate({"device_id": dev, "data_dir": str(data / dev),
                                              "scopes": list(scopes)})
            with Agent.open(cfg, catalog, create=False) as agent:
                assert agent.status().pending == 0
                assert compare(store, agent, scopes, catalog.collections) == []
