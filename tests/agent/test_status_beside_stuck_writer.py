"""Opening the store to read it (`waystation agent status`, `Agent.open`) takes no write
transaction on a store that needs nothing recorded: a daemon stuck inside a write
transaction (stopped, a debugger, an SD card stalled in fsync) holds LMDB's one writer
lock, and status must still answer, not wait for it forever."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import lmdb

from agent.api import Agent
from schemas.collection import Catalog, example_catalog_path
from tests.agent.agentkit import make_cfg
from tests.e2e.fleet import waystation_argv
from tests.helpers import wait_until

ROOT = Path(__file__).resolve().parents[2]

STUCK_WRITER = """
import os, signal, sys
from pathlib import Path
from agent.api import Agent
from schemas.collection import example_catalog_path, load_catalog
from tests.agent.agentkit import make_cfg

agent = Agent.open(make_cfg(Path(sys.argv[1])), load_catalog(example_catalog_path()))

def stuck(tx):
    Path(sys.argv[2]).touch()
    os.kill(os.getpid(), signal.SIGSTOP)   # inside the write transaction

agent._core.store.write(stuck)
"""


def _config(data_dir: Path) -> Path:
    path = data_dir.parent / "agent.toml"
    path.write_text(f'device_id = "van-1"\nscopes = ["route-42", "depot-7", "fleet"]\n'
                    f'data_dir = "{data_dir}"\nschema_file = "{example_catalog_path()}"\n'
                    '[mqtt]\nhost = "127.0.0.1"\nport = 1\n', encoding="utf-8")
    return path


def test_status_answers_while_another_process_holds_the_write_lock(
        tmp_path: Path, catalog: Catalog) -> None:
    data, ready = tmp_path / "data", tmp_path / "ready"
    with Agent.open(make_cfg(data), catalog) as first:
        first.put("tasks", "t-1", {"route": "route-42"})
    writer = subprocess.Popen([sys.executable, "-c", STUCK_WRITER, str(data), str(ready)],
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        wait_until(ready.exists, timeout=60, message="the writer inside its transaction")
        try:
            out = subprocess.run(waystation_argv("agent", "status", "--json", "--config",
                                                 str(_config(data))),
                                 capture_output=True, text=True, timeout=30, check=False)
        except subprocess.TimeoutExpired:
            raise AssertionError("`agent status` waited for the stuck writer's lock") from None
        assert out.returncode == 0, out.stderr
        status = json.loads(out.stdout)
        assert status["pending"] == 1 and "1 change saved locally" in status["summary"]
        # ... and reading it recorded nothing: the next opener finds the store as it was.
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(30)
    with Agent.open(make_cfg(data), catalog, create=False) as again:
        assert again.status().pending == 1


def _status(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(waystation_argv("agent", "status", "--json", "--config", str(config)),
                          capture_output=True, text=True, timeout=60, check=False)


def test_status_of_a_store_the_previous_release_wrote(tmp_path: Path, catalog: Catalog) -> None:
    """A store without the databases this version adds (written before an upgrade, its
    daemon not started since) cannot be opened read-only: status opens it as before
    (creating them) instead of failing with LMDB's "mdb_dbi_open: Permission denied"."""
    data = tmp_path / "data"
    with Agent.open(make_cfg(data), catalog) as first:
        first.put("tasks", "t-1", {"route": "route-42"})
    env = lmdb.open(str(data / "agent.lmdb"), max_dbs=32)
    with env.begin(write=True) as txn:
        for name in (b"idem_a", b"idem_c"):   # added after the previous release
            txn.drop(env.open_db(name, txn=txn), delete=True)
    env.close()
    for _ in range(2):  # the second run finds the databases the first one created
        out = _status(_config(data))
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["pending"] == 1


def test_status_of_a_store_the_first_release_wrote(tmp_path: Path) -> None:
    """The committed format-1 store (tests/fixtures/agent_format1): status migrates it
    (a write) and answers, as before status opened stores read-only."""
    env_dir = tmp_path / "data" / "agent.lmdb"
    env_dir.mkdir(parents=True)
    shutil.copy(ROOT / "tests" / "fixtures" / "agent_format1" / "data.mdb", env_dir)
    config = tmp_path / "agent.toml"
    config.write_text(f'device_id = "van-old"\nscopes = ["route-1", "depot-1"]\n'
                      f'data_dir = "{env_dir.parent}"\n', encoding="utf-8")
    out = _status(config)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["device_id"] == "van-old"
