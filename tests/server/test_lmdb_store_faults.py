"""The server's LMDB store when the disk fills up or the map keeps being resized:
a clear StoreError, nothing committed lost, and writes work again once there is room."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import lmdb
import pytest

from broker.errors import StoreError, StoreFullError
from broker.server.store.lmdb_store import LmdbStore
from tests.small_disk import small_disk

BLOB = "x" * 50_000


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs (needs root and mount rights; skipped otherwise)."""
    with small_disk(tmp_path / "tiny", "3m") as mnt:
        yield mnt


def test_full_disk_is_a_store_error_and_keeps_what_was_committed(tiny_disk: Path) -> None:
    """ENOSPC while the map still has room: the write fails with a StoreError naming
    the store, every earlier commit is intact after reopening, and once space is freed
    the same write succeeds."""
    filler = tiny_disk / "filler"
    filler.write_bytes(b"\0" * (512 * 1024))   # something the operator can delete
    path = tiny_disk / "server"
    written: list[str] = []
    with LmdbStore(path, map_size_mb=64, max_map_size_mb=64) as store:
        with pytest.raises(StoreFullError, match=rf"disk holding the server store at {path}/store "
                           r"is full .*: free disk space") as info:
            for i in range(200):
                key = f"t-{i:03d}"
                store.transact(lambda t, k=key: t.put_record("tasks", k, {"blob": BLOB}))
                written.append(key)
        assert "No space left" in str(info.value) or "ENOSPC" in str(info.value) \
            or "Input/output" in str(info.value), info.value
        assert len(written) > 5
    with LmdbStore(path, map_size_mb=64, max_map_size_mb=64) as store:
        with store.read() as txn:
            assert all(txn.get_record("tasks", k) == {"blob": BLOB} for k in written)
            assert txn.get_record("tasks", f"t-{len(written):03d}") is None
        filler.unlink()
        store.transact(lambda t: t.put_record("tasks", "after", {"blob": "small"}))
        with store.read() as txn:
            assert txn.get_record("tasks", "after") == {"blob": "small"}


def test_map_resized_again_and_again_gives_up_with_retry(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Beginning a transaction that keeps meeting MDB_MAP_RESIZED (another process
    growing the map each time) gives up after three tries with a StoreError saying to
    retry, instead of spinning."""
    with LmdbStore(tmp_path) as store:
        env = store._env
        calls = []

        class Resizing:
            def begin(self, **kwargs: object) -> object:
                calls.append(kwargs)
                raise lmdb.MapResizedError("injected: map resized by another process")

            def set_mapsize(self, size: int) -> None:
                env.set_mapsize(size)

        monkeypatch.setattr(store, "_env", Resizing())
        with pytest.raises(StoreError, match="keeps being resized; retry"):
            store.transact(lambda t: t.put_record("tasks", "x", {"a": 1}))
        assert len(calls) == 3
        monkeypatch.setattr(store, "_env", env)
        store.transact(lambda t: t.put_record("tasks", "x", {"a": 1}))
        with store.read() as txn:
            assert txn.get_record("tasks", "x") == {"a": 1}
