"""The device's LMDB store at its edges: a disk too full to create the store, and a map
that keeps being resized under a reader."""

from __future__ import annotations

from pathlib import Path

import lmdb
import pytest

from agent.api import Agent
from agent.errors import StorageError, StorageFullError
from schemas.collection import Catalog
from tests.agent.agentkit import make_cfg
from tests.agent.test_agent_store import tiny_disk  # noqa: F401 - fixture


def test_no_room_to_create_the_store_is_storage_full(tiny_disk: Path,  # noqa: F811
                                                     catalog: Catalog) -> None:
    """A full disk when the store is first opened: StorageFullError naming it (before
    the fix, LMDB's sparse lock file killed the process with SIGBUS on its first
    write), and the store opens once there is room."""
    filler = tiny_disk / "filler"
    with filler.open("wb") as out:
        try:
            while True:
                out.write(b"\0" * 65536)
        except OSError:
            pass
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
        with pytest.raises(StorageError, match="keeps being resized; try again"):
            ag.get("tasks", "t-1")
        assert len(begins) > 1
        monkeypatch.setattr(store, "_env", env)
        assert ag.get("tasks", "t-1") is not None
