"""README.md, "The local API in two minutes": the shell block, pasted as it stands into
bash in a fresh directory (with no broker, as the README says), prints what its comments
show. Before, the block ran its first `curl` before the agent listened: every request
failed silently (`curl -s`), and the stream of the feed never returned."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli.procs import clean_env
from tests.helpers import free_port

REPO = Path(__file__).resolve().parents[2]


def readme_blocks() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## The local API in two minutes", 1)[1].split("\n## ", 1)[0]
    return "".join(re.findall(r"```sh\n(.*?)```", section, re.S))  # the API, a transaction


def documents(stdout: str) -> list[dict[str, object]]:
    """The JSON documents curl printed, one after the other (each on a line of its own),
    the feed's Server-Sent Events left out."""
    decoder, found, at = json.JSONDecoder(), [], 0
    while (at := stdout.find("{", at)) != -1:
        if stdout.startswith("data: ", max(0, at - 6)):
            at = stdout.index("\n", at)
            continue
        doc, at = decoder.raw_decode(stdout, at)
        found.append(doc)
    return found


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_the_readme_local_api_block_runs_as_pasted(tmp_path: Path) -> None:
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    # `.venv/bin/waystation` as the quick start leaves it: this interpreter's command.
    shim = tmp_path / ".venv" / "bin" / "waystation"
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} -m waystation \"$@\"\n")
    shim.chmod(0o755)
    env = clean_env({"WAYSTATION_AGENT__MQTT__PORT": str(free_port()),  # no broker there
                     "PYTHONPATH": str(REPO)})
    script = readme_blocks() + "\nkill %1; wait %1\n"
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, text=True,
                          capture_output=True, timeout=120, check=False)
    out = documents(done.stdout)
    assert "}{" not in done.stdout  # each answer on a line of its own, as the comments show
    patched = out[0]
    assert patched["state"] == "pending" and patched["message"].startswith("saved locally")
    record = out[1]
    assert record["pending"] == 1 and record["sync"] == {"route": "pending",
                                                         "status": "pending"}
    assert out[2]["agent_running"] is True
    assert "event: retrying" in done.stdout and "event: local" in done.stdout
    page = out[3]
    assert page["index"] == "status,eta" and len(page["records"]) == 1
    assert len(out) == 5, done.stdout
    txn = out[4]
    assert txn["message"].startswith("saved locally as one transaction"), done.stderr
    assert not (tmp_path / "waystation-data" / "agent" / "api.sock").exists()


def test_the_readme_transaction_block_runs_in_a_fresh_directory(tmp_path: Path) -> None:
    """The README's Python block opens the agent itself (it showed only `agent....`
    calls, with no word of where `agent` comes from, on bins that did not exist)."""
    text = (REPO / "README.md").read_text()
    section = text.split("## The local API in two minutes", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]
    check = ('\nfinal = agent.get("inventory", "bin-b")\n'
             'print(final.fields["stock"], agent.get("inventory", "bin-a").fields["stock"])\n')
    done = subprocess.run([sys.executable, "-c", block + check], cwd=tmp_path, text=True,
                          env=clean_env({"PYTHONPATH": str(REPO)}), capture_output=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["2", "3"]
