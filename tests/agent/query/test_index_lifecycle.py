"""Indexes over the life of a store: built when added to the schema (resumably, also
after kill -9), dropped when removed, kept in step by every process, whatever crashes."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agent.api import Agent
from agent.query import CursorInvalid, IndexNotReady, IndexRequired
from agent.query.maintain import load_registry
from tests.agent.agentkit import make_cfg
from tests.agent.query.checks import assert_indexes_consistent, assert_query_matches_reference
from tests.agent.query.index_worker import EXTRA_INDEX, catalog

WORKER = Path(__file__).with_name("index_worker.py")
BY_STATUS_CUSTOMER = {"collection": "tasks", "where": {"status": "out"},
                      "order_by": "customer"}


def _fill(ag: Agent, n: int) -> None:
    for i in range(n):
        ag.put("tasks", f"t{i:04d}", {"route": "route-42", "status": ["out", "done"][i % 2],
                                      "customer": f"c{(i * 7) % n:04d}", "eta": i})


def _state(ag: Agent, fields: list[str]) -> str | None:
    for ix in ag.indexes():
        if ix["collection"] == "tasks" and ix["fields"] == fields:
            return str(ix["state"])
    return None


def test_added_index_is_built_on_open_and_removed_one_dropped(tmp_path: Path) -> None:
    """Opening with a schema that adds an index builds it before open returns; opening
    with one that removes it drops its entries; re-adding builds it afresh."""
    cfg = make_cfg(tmp_path)
    with Agent.open(cfg, catalog(extra=False)) as ag:
        _fill(ag, 120)
        with pytest.raises(IndexRequired):
            ag.query(BY_STATUS_CUSTOMER)
    with capture_logs() as logs, Agent.open(cfg, catalog(extra=True)) as ag:
        assert _state(ag, EXTRA_INDEX) == "ready"
        assert_indexes_consistent(ag)
        started = [e for e in logs if e["event"] == "index_build_started"]
        assert [(e["collection"], e["index"]) for e in started] == [("tasks",
                                                                     "status,customer")]
        assert [e["event"] for e in logs][-1] == "indexes_ready"
        assert_query_matches_reference(ag, BY_STATUS_CUSTOMER, limit=17)
        cursor = ag.query({**BY_STATUS_CUSTOMER, "limit": 5}).next
    with Agent.open(cfg, catalog(extra=False)) as ag:
        assert _state(ag, EXTRA_INDEX) is None
        assert_indexes_consistent(ag)  # no entry of the dropped index is left
        with pytest.raises(IndexRequired):
            ag.query(BY_STATUS_CUSTOMER)
    with Agent.open(cfg, catalog(extra=True)) as ag:
        assert_indexes_consistent(ag)
        with pytest.raises(CursorInvalid, match="rebuilt"):
            ag.query({**BY_STATUS_CUSTOMER, "limit": 5, "after": cursor})


def test_query_on_an_index_still_building_says_so(tmp_path: Path) -> None:
    """While an index is being built, a query it would serve is refused with
    IndexNotReady; writes meanwhile keep it in step; the build then completes."""
    cfg = make_cfg(tmp_path)
    with Agent.open(cfg, catalog(extra=False)) as ag:
        _fill(ag, 90)
    with Agent.open(cfg, catalog(extra=True), build_indexes=False) as ag:
        assert _state(ag, EXTRA_INDEX) == "build"
        with pytest.raises(IndexNotReady, match="still being built"):
            ag.query(BY_STATUS_CUSTOMER)
        assert ag.query("tasks", where={"status": "out"}, order_by="eta").index == (
            "status,eta"), "other indexes still serve"
        progress: list[tuple[str, int]] = []
        ag.build_indexes(batch=25, progress=lambda ix: progress.append((ix.state, ix.done)))
        assert progress == [("build", 25), ("build", 50), ("build", 75), ("ready", 90)]
        ag.put("tasks", "t0003", {"status": "out"})   # passed by the build already
        ag.put("tasks", "late", {"route": "route-42", "status": "out", "customer": "a"})
        ag.delete("tasks", "t0088")
        assert_indexes_consistent(ag)
        assert_query_matches_reference(ag, BY_STATUS_CUSTOMER)


def test_writes_during_a_build_keep_the_index_exact(tmp_path: Path) -> None:
    """Records written, changed and deleted on both sides of a build's position come out
    exact once the build ends."""
    cfg = make_cfg(tmp_path)
    with Agent.open(cfg, catalog(extra=False)) as ag:
        _fill(ag, 100)
    with Agent.open(cfg, catalog(extra=True), build_indexes=False) as ag:
        rng = random.Random(7)

        def meddle(_: object) -> None:
            for _ in range(5):
                key = f"t{rng.randrange(110):04d}"
                if rng.random() < 0.2:
                    if ag.get("tasks", key) is not None:
                        ag.delete("tasks", key)
                else:
                    ag.put("tasks", key, {"route": "route-42",
                                          "status": rng.choice(["out", "done"]),
                                          "customer": rng.choice(["a", "b", "c"])})

        ag.build_indexes(batch=15, progress=meddle)
        assert_indexes_consistent(ag)
        assert_query_matches_reference(ag, BY_STATUS_CUSTOMER, limit=9)


def test_a_process_with_an_older_schema_maintains_every_index(tmp_path: Path) -> None:
    """A process whose schema lacks an index (opened before it was added) still keeps it
    in step: writers follow the store's list of indexes, not their own schema."""
    cfg = make_cfg(tmp_path)
    old = Agent.open(cfg, catalog(extra=False))
    try:
        _fill(old, 20)
        with Agent.open(cfg, catalog(extra=True)) as new:
            old.put("tasks", "t0001", {"status": "out", "customer": "zz"})
            old.delete("tasks", "t0002")
            old.put("tasks", "fresh", {"route": "route-42", "status": "out"})
            assert_indexes_consistent(new)
            assert_query_matches_reference(new, BY_STATUS_CUSTOMER)
    finally:
        old.close()


def _start(data_dir: Path, *args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, str(WORKER), str(data_dir), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        _, err = proc.communicate(timeout=30)
        raise AssertionError(f"worker did not start: {line!r} {err}")
    return proc


@pytest.mark.slow
def test_build_killed_half_way_resumes(tmp_path: Path) -> None:
    """A build killed with SIGKILL after some batches left its progress recorded; the
    next open resumes from there and the index comes out exact."""
    cfg = make_cfg(tmp_path)
    with Agent.open(cfg, catalog(extra=False)) as ag:
        _fill(ag, 400)
    proc = _start(tmp_path, "build", "4")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err
    assert "finished" not in out
    assert out.split("\n")[-2].endswith("build 160"), out
    with Agent.open(cfg, catalog(extra=True), build_indexes=False) as ag:
        registry = ag._core.read(lambda work: load_registry(work.tx))
        (building,) = [ix for ix in registry.indexes if ix.state == "build"]
        assert building.fields == tuple(EXTRA_INDEX) and building.done == 160
        assert building.at == "t0160", "resumes at the first record not indexed"
        seen: list[int] = []
        ag.build_indexes(batch=100, progress=lambda ix: seen.append(ix.done))
        assert seen == [260, 360, 400]
        assert_indexes_consistent(ag)
        assert_query_matches_reference(ag, BY_STATUS_CUSTOMER, limit=50)


@pytest.mark.slow
def test_index_never_disagrees_with_views_after_kill_9(tmp_path: Path) -> None:
    """A process writing, changing and deleting records is killed with SIGKILL at random
    points; after each crash every index entry is exactly what the views imply."""
    cfg = make_cfg(tmp_path)
    rng = random.Random(11)
    for round_ in range(3):
        proc = _start(tmp_path, "write", str(round_))
        assert proc.stdout is not None
        target = rng.randrange(50, 250)
        for _ in range(target):
            assert proc.stdout.readline(), proc.stderr.read() if proc.stderr else "died"
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        with Agent.open(cfg, catalog(extra=True)) as ag:
            assert_indexes_consistent(ag)
            assert_query_matches_reference(ag, BY_STATUS_CUSTOMER)
            assert_query_matches_reference(
                ag, {"collection": "tasks", "where": {"labels": "x"}, "order_by": "eta"})


def test_building_prints_nothing_into_an_apps_output(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Before an entry point configures logging, building an index writes nothing to
    stdout (it would land in an app's or a `--json` command's output)."""
    import structlog

    structlog.reset_defaults()
    cfg = make_cfg(tmp_path)
    with Agent.open(cfg, catalog(extra=False)) as ag:
        _fill(ag, 5)
    with Agent.open(cfg, catalog(extra=True)) as ag:
        assert _state(ag, EXTRA_INDEX) == "ready"
    assert capsys.readouterr().out == ""
