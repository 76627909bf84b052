"""`waystation agent salvage`: the pending writes of a moved-aside store (damaged or not)
queued again in the device's current store, with real LMDB files and real processes.

Before: the command did not exist; the writes the damaged store still held were lost
for the user unless an operator re-typed them from an `mdb_dump`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from agent.api import Agent
from agent.salvage_pages import _leaf_nodes
from agent.store import ENV_DIRNAME, n_key
from schemas.collection import Catalog
from tests.agent.atrest_kit import cfg_for
from tests.agent.salvage_kit import (
    build_old,
    config,
    digest_dir,
    move_aside,
    salvage,
    salvage_json,
    same_change,
)
from tests.agent.test_store_damage import PAGE, _overwrite, _random
from tests.cli.procs import clean_env, waystation_argv
from tests.helpers import wait_until
from waystation.cli.exitcodes import EXIT_DAMAGED, EXIT_USAGE


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory, catalog: Catalog) -> tuple[Path, Any]:
    path = tmp_path_factory.mktemp("old") / "data"
    return path, build_old(path, catalog)


def _copy(template: tuple[Path, Any], dest: Path) -> tuple[Path, Path, dict[str, Any]]:
    """(data_dir, the moved-aside store, what it held)."""
    shutil.copytree(template[0], dest)
    return dest, move_aside(dest), template[1]


def _current(data_dir: Path, catalog: Catalog) -> Agent:
    return Agent.open(cfg_for(data_dir), catalog, create=False)


def _check_queued(data_dir: Path, catalog: Catalog, report: dict[str, Any],
                  held: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Every change the report says was queued is in the current outbox as the old one
    was; returns old n -> new entry."""
    pending = held["pending"]
    with _current(data_dir, catalog) as ag:
        new = {e["ch"]["n"]: e for e in ag.pending()}
    moved = {item["n"]: int(item["queued_as"].split(":")[1]) for item in report["recovered"]}
    assert len(set(moved.values())) == len(moved)
    for old_n, new_n in moved.items():
        assert same_change(pending[old_n], new[new_n], moved), (pending[old_n], new[new_n])
    return {old_n: new[new_n] for old_n, new_n in moved.items()}


def test_intact_store_dry_run_then_apply_then_again(template: tuple[Path, Any], tmp_path: Path,
                                                    catalog: Catalog) -> None:
    data_dir, old, held = _copy(template, tmp_path / "data")
    before = digest_dir(old)
    text = salvage(data_dir, old)
    assert text.returncode == 0, text.stderr
    assert f"{len(held['pending'])} pending change(s) read" in text.stdout
    assert "dry run: nothing was written; run again with --apply" in text.stdout
    dry = salvage_json(data_dir, old)
    assert dry["dry_run"] and dry["counts"]["recovered"] == len(held["pending"])
    assert {i["n"] for i in dry["recovered"]} == set(held["pending"])
    with _current(data_dir, catalog) as ag:
        assert ag.pending() == []  # a dry run writes nothing

    report = salvage_json(data_dir, old, "--apply")
    assert not report["dry_run"]
    assert report["counts"]["recovered"] == len(held["pending"])
    assert report["counts"]["unreadable_entries"] == report["counts"]["unreadable_ranges"] == 0
    queued = _check_queued(data_dir, catalog, report, held)
    # The old order, and a transaction again as one transaction (consecutive numbers).
    new_ns = [queued[n]["ch"]["n"] for n in sorted(queued)]
    assert new_ns == sorted(new_ns)
    txn = [e for e in queued.values() if e.get("x")]
    assert len(txn) == 2 and txn[0]["x"] == txn[1]["x"] == [min(e["ch"]["n"] for e in txn), 2]
    # Increments and set adds are flagged: they would count twice if their original had
    # reached the server.
    uncertain = {i["n"] for i in report["recovered"] if i["uncertain"]}
    assert uncertain == {n for n, e in held["pending"].items()
                         if e["ch"].get("i") or e["ch"].get("a")}
    with _current(data_dir, catalog) as ag:
        for name, view in held["views"].items():
            c, k = name.split("/")
            got = ag.get(c, k, include_deleted=True)
            assert view == (None if got is None else (got.deleted, got.fields)), name
        local = [e for e in ag.feed_after(0, 10_000) if e.kind == "local"]
        assert len(local) == len(held["pending"])
        count = len(ag.pending())

    again = salvage_json(data_dir, old, "--apply")  # idempotent
    assert again["counts"]["recovered"] == 0
    assert again["counts"]["already_salvaged"] == len(held["pending"])
    with _current(data_dir, catalog) as ag:
        assert len(ag.pending()) == count
    assert digest_dir(old) == before  # the old store is never written, not even a lock


def _page_of(data: Path, n: int) -> int:
    """The page holding outbox entry `n` (read with LMDB's page layout)."""
    fd = os.open(data, os.O_RDONLY)
    try:
        for pgno in range(2, data.stat().st_size // PAGE):
            page = os.pread(fd, PAGE, pgno * PAGE)
            for key, value in _leaf_nodes(page, pgno, PAGE, fd):
                if key == n_key(n) and value.startswith(b'{"ch"'):
                    return pgno
    finally:
        os.close(fd)
    raise AssertionError(f"no page holds outbox entry {n}")


def _all_accounted(report: dict[str, Any], held: dict[str, Any]) -> set[int]:
    """Every pending change of the old store is recovered or inside what the report
    calls unreadable; returns the recovered numbers."""
    got = {i["n"] for i in report["recovered"]}
    bad = {e["n"] for e in report["unreadable"]["entries"]}
    for n in held["pending"]:
        assert n in got or n in bad or any(a <= n <= b for a, b in
                                           report["unreadable"]["ranges"]), n
    assert got <= set(held["pending"])
    return got


def test_store_damaged_in_a_middle_page(template: tuple[Path, Any], tmp_path: Path,
                                        catalog: Catalog) -> None:
    """Random bytes over one page in the middle of the outbox's leaves: the changes on
    that page are reported unreadable, every other one (those after it too) is queued."""
    data_dir, old, held = _copy(template, tmp_path / "data")
    data = old / "data.mdb"
    middle = sorted(held["pending"])[len(held["pending"]) // 2]
    _overwrite(data, _page_of(data, middle) * PAGE, _random(PAGE))
    before = digest_dir(old)
    report = salvage_json(data_dir, old, "--apply")
    got = _all_accounted(report, held)
    assert report["counts"]["unreadable_ranges"] + report["counts"]["unreadable_entries"] >= 1
    assert len(got) >= len(held["pending"]) // 2
    lost = report["unreadable"]["ranges"]
    assert any(n > lost[0][1] for n in got)  # read on past the damaged page
    _check_queued(data_dir, catalog, report, held)
    assert digest_dir(old) == before


@pytest.mark.parametrize("how", ["half_not_on_a_page", "by_the_last_page"])
def test_truncated_store(template: tuple[Path, Any], tmp_path: Path, catalog: Catalog,
                         how: str) -> None:
    """data.mdb cut short (a power loss): LMDB's root is on the last pages, so its tree
    is lost; the changes on the pages that remain are read from the raw pages."""
    data_dir, old, held = _copy(template, tmp_path / "data")
    data = old / "data.mdb"
    pages = data.stat().st_size // PAGE
    os.truncate(data, pages // 2 * PAGE + 123 if how == "half_not_on_a_page"
                else (pages - 1) * PAGE)
    report = salvage_json(data_dir, old, "--apply")
    got = _all_accounted(report, held)
    assert got and all(i.get("from_pages") for i in report["recovered"])
    if how == "by_the_last_page":
        assert got == set(held["pending"])  # only the root was lost
    _check_queued(data_dir, catalog, report, held)


def test_store_with_a_lost_root_and_acked_changes_on_freed_pages(
        tmp_path: Path, catalog: Catalog) -> None:
    """Not compacted: freed pages still hold copies of outbox entries acked since. Read
    from raw pages, those are recognised by the old store's journal and not queued."""
    data_dir = tmp_path / "data"
    held = build_old(data_dir, catalog, acked=60, compact=False)
    old = move_aside(data_dir)
    data = old / "data.mdb"
    _overwrite(data, (data.stat().st_size // PAGE - 1) * PAGE, _random(PAGE))
    report = salvage_json(data_dir, old, "--apply")
    got = _all_accounted(report, held)
    assert not got & set(range(1, 61))
    _check_queued(data_dir, catalog, report, held)


def test_encrypted_store_needs_its_key(tmp_path: Path, catalog: Catalog) -> None:
    data_dir = tmp_path / "data"
    key = tmp_path / "key"
    key.write_bytes(os.urandom(32))
    held = build_old(data_dir, catalog, key=key, puts=20, compact=False)
    old = move_aside(data_dir)
    result = salvage(data_dir, old, "--apply")
    assert result.returncode == EXIT_USAGE, result.stderr
    assert "encrypted" in result.stderr and "--key-file" in result.stderr
    wrong = tmp_path / "wrong"
    wrong.write_bytes(os.urandom(32))
    result = salvage(data_dir, old, "--apply", "--key-file", str(wrong))
    assert result.returncode == EXIT_USAGE and "not the key" in result.stderr, result.stderr
    report = salvage_json(data_dir, old, "--apply", "--key-file", str(key))
    assert report["old_store"]["encrypted"]
    assert report["counts"]["recovered"] == len(held["pending"])
    _check_queued(data_dir, catalog, report, held)


def test_hostile_inputs_are_refused_with_what_to_do(template: tuple[Path, Any],
                                                     tmp_path: Path, catalog: Catalog) -> None:
    data_dir, old, _held = _copy(template, tmp_path / "data")
    with Agent.open(cfg_for(data_dir), catalog) as ag:  # the fresh store exists
        ag.put("tasks", "fresh-1", {"route": "route-42"})
    junk = tmp_path / "junk.bin"
    junk.write_bytes(os.urandom(10_000))
    empty = tmp_path / "empty"
    empty.mkdir()
    copy = tmp_path / "copy.lmdb"
    shutil.copytree(data_dir / ENV_DIRNAME, copy)
    cases = {
        tmp_path / "missing": "does not exist",
        junk: "is a file, not an agent store",
        empty: "is not an agent store",
        data_dir / ENV_DIRNAME: "current store",
        data_dir: "current store",
        copy: "copy of the agent's current store",
    }
    for path, words in cases.items():
        result = salvage(data_dir, path, "--apply")
        assert result.returncode == EXIT_USAGE, (path, result.stderr)
        assert result.stderr.startswith("error: ") and words in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    # A directory holding garbage named data.mdb: LMDB cannot open it at all.
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "data.mdb").write_bytes(os.urandom(20 * PAGE))
    result = salvage(data_dir, fake, "--apply")
    assert result.returncode == 1 and "nothing in it can be salvaged" in result.stderr
    # --apply and --dry-run together.
    result = salvage(data_dir, old, "--apply", "--dry-run")
    assert result.returncode == EXIT_USAGE and "not both" in result.stderr
    with _current(data_dir, catalog) as ag:
        assert len(ag.pending()) == 1  # none of it wrote anything


def test_current_store_damaged_is_refused(template: tuple[Path, Any], tmp_path: Path,
                                          catalog: Catalog) -> None:
    data_dir, old, _held = _copy(template, tmp_path / "data")
    with Agent.open(cfg_for(data_dir), catalog) as ag:
        for i in range(200):
            ag.put("tasks", f"fresh-{i}", {"route": "route-42", "notes": "z" * 200})
    data = data_dir / ENV_DIRNAME / "data.mdb"
    _overwrite(data, 2 * PAGE, bytes(data.stat().st_size - 2 * PAGE))  # all but the meta
    before = digest_dir(data.parent)["data.mdb"]
    result = salvage(data_dir, old, "--apply")
    assert result.returncode == EXIT_DAMAGED, result.stderr
    assert "store damaged" in result.stderr and str(data) in result.stderr
    assert digest_dir(data.parent)["data.mdb"] == before  # never written


def test_store_of_another_device_is_refused(tmp_path: Path, catalog: Catalog) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    other = tmp_path / "other"
    build_old(other, catalog, puts=5, compact=False)
    old = move_aside(other)
    result = salvage(data_dir, old, "--apply", cfg=config(data_dir, device="van-2"))
    assert result.returncode == EXIT_USAGE, result.stderr
    assert "belongs to device 'van-1'" in result.stderr and "'van-2'" in result.stderr


def test_salvage_killed_mid_apply_then_run_again_queues_each_change_once(
        tmp_path: Path, catalog: Catalog) -> None:
    """kill -9 while --apply queues: each change and its record in the ledger commit
    together, so the second run queues exactly what the first did not."""
    data_dir = tmp_path / "data"
    held = build_old(data_dir, catalog, puts=600, compact=False)
    old = move_aside(data_dir)
    with Agent.open(cfg_for(data_dir), catalog):
        pass  # the fresh store exists, so the test can watch it fill
    popen = subprocess.Popen(waystation_argv("agent", "salvage", str(old), "--apply",
                                             "--config", str(config(data_dir))),
                             cwd=data_dir, env=clean_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        with _current(data_dir, catalog) as ag:
            wait_until(lambda: len(ag.pending()) >= 20, 120)
        popen.kill()
    finally:
        popen.wait(30)
    with _current(data_dir, catalog) as ag:
        first = len(ag.pending())
    assert 20 <= first < len(held["pending"])  # killed half-way
    report = salvage_json(data_dir, old, "--apply")
    assert report["counts"]["already_salvaged"] == first
    assert report["counts"]["recovered"] == len(held["pending"]) - first
    with _current(data_dir, catalog) as ag:
        stamps = sorted(e["ch"]["h"] for e in ag.pending())
    assert stamps == sorted(e["ch"]["h"] for e in held["pending"].values())


def test_encrypted_store_with_both_meta_pages_lost(tmp_path: Path, catalog: Catalog) -> None:
    """No meta page, so no encryption token: the wrapped data key beside data.mdb says
    the store is encrypted, and each value's AES-GCM tag proves the key."""
    data_dir = tmp_path / "data"
    key = tmp_path / "key"
    key.write_bytes(os.urandom(32))
    held = build_old(data_dir, catalog, key=key, puts=20, compact=False)
    old = move_aside(data_dir)
    _overwrite(old / "data.mdb", 0, _random(2 * PAGE))
    result = salvage(data_dir, old, "--apply")
    assert result.returncode == EXIT_USAGE and "--key-file" in result.stderr, result.stderr
    report = salvage_json(data_dir, old, "--apply", "--key-file", str(key))
    assert report["old_store"]["encrypted"]
    assert {i["n"] for i in report["recovered"]} == set(held["pending"])
    assert all(i.get("from_pages") for i in report["recovered"])
    _check_queued(data_dir, catalog, report, held)


def test_two_salvage_runs_at_once_queue_each_change_once(tmp_path: Path,
                                                         catalog: Catalog) -> None:
    """Two operators (or a retried script) run --apply together: the ledger is checked
    again inside each write transaction, so nothing is queued twice."""
    data_dir = tmp_path / "data"
    held = build_old(data_dir, catalog, puts=300, compact=False)
    old = move_aside(data_dir)
    with Agent.open(cfg_for(data_dir), catalog):
        pass
    argv = waystation_argv("agent", "salvage", str(old), "--apply", "--json", "--config",
                           str(config(data_dir)))
    procs = [subprocess.Popen(argv, cwd=data_dir, env=clean_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    reports = [json.loads(out) for out, _ in outs]
    assert sum(r["counts"]["recovered"] for r in reports) == len(held["pending"])
    with _current(data_dir, catalog) as ag:
        stamps = sorted(e["ch"]["h"] for e in ag.pending())
    assert stamps == sorted(e["ch"]["h"] for e in held["pending"].values())
