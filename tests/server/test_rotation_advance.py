"""The server's tick for password rotations (`broker.server.rotation_files.advance`):
the file step a rotation owes is carried out and recorded once; a step that fails (the
password file cannot be read or written) is retried at every tick, logged once per
interval, and nothing is recorded until it worked. Both backends."""

from __future__ import annotations

from pathlib import Path

import structlog

from broker.embedded.passwords import (
    hash_password,
    overlap_path,
    read_overlap,
    read_password_file,
    write_password_entry,
)
from broker.server import rotation
from broker.server.rotation import Rotation
from broker.server.rotation_files import ERROR_REPEAT_MS, RotationFiles, advance
from broker.server.store.base import Store
from tests.server.conftest import StoreFactory
from tests.server.helpers import make_engine

NEW = "new-password-ABCDEFGHIJ"


def _rot(store: Store) -> Rotation:
    with store.read() as txn:
        row = txn.get_device("van-1")
    assert row is not None
    rot = Rotation.from_json(row.rot)
    assert rot is not None
    return rot


def test_steps_are_done_once_and_failures_retried_quietly(tmp_path: Path,
                                                          store_factory: StoreFactory
                                                          ) -> None:
    """Deadline passed, password file missing: no step, one log line per interval; once
    the file is there: switched, then retired (forced), each recorded once."""
    engine, store, _ = make_engine(tmp_path, {"van-1": ["r1"]}, store=store_factory())
    pw = tmp_path / "broker" / "passwd"
    files = RotationFiles(pw)
    new_hash = hash_password(NEW)
    rotation.start(store, "van-1", NEW, new_hash, 1000, retire_after_s=1)
    engine.tick()
    failing: dict[str, int] = {}
    with structlog.testing.capture_logs() as logs:
        assert advance(store, engine.registry, files, 5000, failing) == 0
        assert advance(store, engine.registry, files, 6000, failing) == 0
        assert advance(store, engine.registry, files, 5000 + ERROR_REPEAT_MS, failing) == 0
    assert [e["event"] for e in logs].count("password_rotation_step_failed") == 2
    assert _rot(store).stage == "sent"

    write_password_entry(pw, "van-1", "old-password-0123456789")
    old_hash = read_password_file(pw)["van-1"]
    assert advance(store, engine.registry, files, 7000, failing) == 1
    engine.tick()
    assert _rot(store).stage == "switched" and failing == {}
    assert read_password_file(pw)["van-1"] == new_hash
    assert read_overlap(overlap_path(pw))["van-1"] == [old_hash]
    assert advance(store, engine.registry, files, 8000, failing) == 1
    engine.tick()
    rot = _rot(store)
    assert rot.stage == "retired" and rot.forced
    assert "van-1" not in read_overlap(overlap_path(pw))
    assert advance(store, engine.registry, files, 9000, failing) == 0


def test_a_rotation_superseded_meanwhile_is_not_recorded(tmp_path: Path,
                                                         store_factory: StoreFactory) -> None:
    """The registry the tick read is older than the store: a newer rotation's row is
    not overwritten with the old rotation's step."""
    engine, store, _ = make_engine(tmp_path, {"van-1": ["r1"]}, store=store_factory())
    pw = tmp_path / "passwd"
    write_password_entry(pw, "van-1", "old-password-0123456789")
    old_hash = read_password_file(pw)["van-1"]
    rotation.start(store, "van-1", NEW, hash_password(NEW), 1000, retire_after_s=0)
    engine.tick()  # the registry holds the first rotation
    second, _ = rotation.start(store, "van-1", "second-password-012345", "$7$1$a$b", 2000,
                               retire_after_s=None)
    assert advance(store, engine.registry, RotationFiles(pw), 3000) == 0
    assert _rot(store).id == second.id and _rot(store).stage == "sent"
    assert read_password_file(pw)["van-1"] == old_hash  # the stale step was not done
