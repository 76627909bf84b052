"""The device's LMDB store at its edges: a disk too full to create the store, a map grown
by another process (the CLI beside the daemon), and a map that keeps being resized under
a reader or a writer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import lmdb
import pytest

from agent.api import Agent
from agent.errors import StorageError, StorageFullError
from schemas.collection import Catalog
from tests.agent.agentkit import make_cfg
from tests.agent.test_agent_store import tiny_disk  # noqa: F401 - fixture
from tests.small_disk import fill_disk


def test_no_room_to_create_the_store_is_storage_full(tiny_disk: Path,  # noqa: F811
                                                     catalog: Catalog) -> None:
    """A full disk when the store is first opened: StorageFullError naming it (before
    the fix, LMDB's sparse lock file killed the process with SIGBUS on its first
    write), and the store opens once there is room."""
    filler = tiny_disk / "filler"
    fill_disk(filler)
    cfg = make_cfg(tiny_disk / "data")
    with pytest.raises(StorageFullError, match="full"):
        Agent.open(cfg, catalog)
    filler.unlink()
    with Agent.open(cfg, catalog) as ag:
        ag.put("tasks", "t-1", {"route": "route-42"})
        assert ag.get("tasks", "t-1") is not None


def test_reader_meeting_endless_map_resizes_gives_up_saying_try_again(
        tmp_path: Path, catalog: Catalog, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every begin meets MDB_MAP_RESIZED (another process growing the map again and
    again): the read gives up with a StorageError saying to try again, instead of
    spinning; the store reads normally afterwards."""
    with Agent.open(make_cfg(tmp_path), catalog) as ag:
        ag.put("tasks", "t-1", {"route": "route-42"})
        store = ag.store
        env = store._env
        begins = []

        class Resizing:
            def begin(self, **kwargs: object) -> object:
                begins.append(kwargs)
                raise lmdb.MapResizedError("injected")

            def set_mapsize(self, size: int) -> None:
                env.set_mapsize(size)

        monkeypatch.setattr(store, "_env", Resizing())
        with pytest.raises(StorageError, match="keeps being resized by another process; try again"):
            ag.get("tasks", "t-1")
        assert len(begins) > 1
        monkeypatch.setattr(store, "_env", env)
        assert ag.get("tasks", "t-1") is not None


# Another process (as `waystation agent put` beside the running daemon) opening the same
# store with the same small map and writing more than that map holds: it grows the map.
_GROWER = """
import sys
from pathlib import Path
from agent.api import Agent
from schemas.collection import example_catalog_path, load_catalog
from tests.agent.agentkit import make_cfg
cfg = make_cfg(Path(sys.argv[1]), map_size_mb=1, max_map_size_mb=64)
with Agent.open(cfg, load_catalog(example_catalog_path())) as ag:
    for i in range(40):
        photo = f"{i:02d}" * 20_000  # 40 kB, under the record limit
        ag.put("tasks", f"big-{i}", {"route": "route-42", "proof": {"photo": photo}})
    print(ag.store.map_size())
"""


class _BeginSpy:
    """The real environment, noting each transaction begin that LMDB refused with
    MDB_MAP_RESIZED (nothing is injected: it only watches)."""

    def __init__(self, env: Any) -> None:
        self._env = env
        self.resized: list[bool] = []  # write flag of each refused begin

    def begin(self, **kwargs: Any) -> Any:
        try:
            return self._env.begin(**kwargs)
        except lmdb.MapResizedError:
            self.resized.append(bool(kwargs.get("write")))
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._env, name)


def test_write_after_another_process_grew_the_map_adopts_the_new_size(
        tmp_path: Path, catalog: Catalog, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second process writes ~1.6 MB into a store opened with a 1 MiB map, growing
    it; this process's next write meets MDB_MAP_RESIZED when it begins, adopts the new
    size and commits: both processes' writes are there, nothing lost."""
    cfg = make_cfg(tmp_path, map_size_mb=1, max_map_size_mb=64)
    with Agent.open(cfg, catalog) as ag:
        ag.put("tasks", "t-1", {"route": "route-42", "status": "out"})
        store = ag.store
        before = store.map_size()
        assert before == 1 << 20
        spy = _BeginSpy(store._env)
        monkeypatch.setattr(store, "_env", spy)
        grown = subprocess.run([sys.executable, "-c", _GROWER, str(tmp_path)],
                               capture_output=True, text=True, timeout=120, check=False,
                               cwd=Path(__file__).resolve().parents[2])
        assert grown.returncode == 0, grown.stderr
        theirs = int(grown.stdout.split()[-1])
        assert theirs > before

        result = ag.put("tasks", "t-2", {"route": "route-42", "status": "in"})
        assert spy.resized == [True]  # the write's begin met the grown map, once
        assert store.map_size() == theirs
        assert result.state == "pending"
        assert ag.get("tasks", "t-2") is not None
        assert ag.get("tasks", "t-1") is not None
        assert all(ag.get("tasks", f"big-{i}") is not None for i in range(40))
        assert len(ag.pending()) == 42


def test_writer_meeting_endless_map_resizes_gives_up_saying_try_again(
        tmp_path: Path, catalog: Catalog, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every write begin meets MDB_MAP_RESIZED (another process growing the map again
    and again): the write gives up with a StorageError saying nothing was written and to
    try again, instead of spinning; nothing of it is in the store, and the same write
    succeeds once the map holds still."""
    with Agent.open(make_cfg(tmp_path), catalog) as ag:
        ag.put("tasks", "t-1", {"route": "route-42"})
        store = ag.store
        env = store._env
        begins = []

        class Resizing:
            def begin(self, **kwargs: Any) -> Any:
                if not kwargs.get("write"):
                    return env.begin(**kwargs)
                begins.append(kwargs)
                raise lmdb.MapResizedError("injected")

            def set_mapsize(self, size: int) -> None:
                env.set_mapsize(size)

        monkeypatch.setattr(store, "_env", Resizing())
        with pytest.raises(StorageError, match="keeps being resized by another process; "
                           "nothing was written, try again"):
            ag.put("tasks", "t-2", {"route": "route-42"})
        assert len(begins) > 1
        monkeypatch.setattr(store, "_env", env)
        assert ag.get("tasks", "t-2") is None
        assert [p["ch"]["k"] for p in ag.pending()] == ["t-1"]
        ag.put("tasks", "t-2", {"route": "route-42"})
        assert ag.get("tasks", "t-2") is not None
