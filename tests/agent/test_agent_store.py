"""The LMDB adapter: format version, identity, map growth, full storage, encryption."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import lmdb
import orjson
import pytest

from agent.api import Agent
from agent.errors import (
    AgentNotInitialised,
    DeviceMismatch,
    EncryptionKeyError,
    StorageFormatError,
    StorageFullError,
)
from agent.store import FORMAT_VERSION
from schemas.collection import Catalog
from tests.agent.agentkit import make_cfg
from tests.small_disk import small_disk

BLOB = "z" * 20_000


def fill(ag: Agent, prefix: str, limit: int = 10_000) -> list[str]:
    """Write big records until the store is full; returns the keys whose write returned."""
    done: list[str] = []
    with pytest.raises(StorageFullError) as info:
        for i in range(limit):
            key = f"{prefix}-{i}"
            ag.put("tasks", key, {"route": "route-42", "proof": {"blob": BLOB, "i": i}})
            done.append(key)
    assert "nothing already stored was lost" in str(info.value)
    return done


def test_write_survives_reopen(tmp_path: Path, catalog: Catalog) -> None:
    """A returned write is in the store after closing and reopening it."""
    cfg = make_cfg(tmp_path)
    with Agent.open(cfg, catalog) as ag:
        ag.put("tasks", "t-1", {"route": "route-42", "status": "out"})
    with Agent.open(cfg, catalog) as ag:
        record = ag.get("tasks", "t-1")
        assert record is not None and record.fields["status"] == "out"


def test_newer_format_version_is_refused(tmp_path: Path, catalog: Catalog) -> None:
    """A store written in a newer on-disk format (a downgrade) is refused, clearly."""
    cfg = make_cfg(tmp_path)
    Agent.open(cfg, catalog).close()
    env = lmdb.open(str(tmp_path / "agent.lmdb"), max_dbs=16)
    meta = env.open_db(b"meta")
    with env.begin(write=True) as txn:
        txn.put(b"format", orjson.dumps(FORMAT_VERSION + 1), db=meta)
    env.close()
    with pytest.raises(StorageFormatError,
                       match=rf"on-disk format {FORMAT_VERSION + 1}.*up to {FORMAT_VERSION}"):
        Agent.open(cfg, catalog)


def test_store_of_another_device_is_refused(tmp_path: Path, catalog: Catalog) -> None:
    """Opening a data_dir created for another device id is refused."""
    Agent.open(make_cfg(tmp_path, device="van-1"), catalog).close()
    with pytest.raises(DeviceMismatch, match="belongs to device 'van-1'"):
        Agent.open(make_cfg(tmp_path, device="van-2"), catalog)


def test_missing_store_is_reported_when_not_creating(tmp_path: Path, catalog: Catalog) -> None:
    """A read-only open of an empty data_dir says nothing has been stored yet."""
    with pytest.raises(AgentNotInitialised, match="no local store"):
        Agent.open(make_cfg(tmp_path), catalog, create=False)


def test_same_store_opened_twice_in_one_process(tmp_path: Path, catalog: Catalog) -> None:
    """Two openers in one process share the environment; closing one keeps the other."""
    cfg = make_cfg(tmp_path)
    first = Agent.open(cfg, catalog)
    second = Agent.open(cfg, catalog)
    first.put("tasks", "t-1", {"route": "route-42"})
    first.close()
    assert second.get("tasks", "t-1") is not None
    second.close()


def test_map_grows_when_full(tmp_path: Path, catalog: Catalog) -> None:
    """A write that does not fit the map doubles it (up to the limit) and succeeds."""
    with Agent.open(make_cfg(tmp_path, map_size_mb=1, max_map_size_mb=64), catalog) as ag:
        for i in range(150):
            ag.put("tasks", f"i-{i}", {"route": "route-42", "proof": {"blob": BLOB}})
        assert ag.store.map_size() > 1 << 20
        assert ag.status().pending == 150


def test_map_limit_raises_storage_full_and_keeps_data(tmp_path: Path, catalog: Catalog) -> None:
    """At storage.max_map_size_mb a write fails with StorageFullError; data is intact."""
    cfg = make_cfg(tmp_path, map_size_mb=1, max_map_size_mb=2)
    with Agent.open(cfg, catalog) as ag:
        done = fill(ag, "i")
        assert ag.status().pending == len(done)
        with pytest.raises(StorageFullError, match="max_map_size_mb = 2"):
            ag.put("tasks", "more", {"route": "route-42", "proof": {"blob": BLOB}})
    with Agent.open(cfg, catalog) as ag:
        assert [r.key for r in ag.list("tasks")] == sorted(done)
        assert ag.status().pending == len(done)


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs (needs root and mount rights; skipped otherwise)."""
    with small_disk(tmp_path / "tiny", "3m") as mnt:
        yield mnt


def test_full_disk_raises_storage_full_and_keeps_data(tiny_disk: Path, catalog: Catalog) -> None:
    """ENOSPC from the disk: StorageFullError naming the path; earlier writes intact."""
    cfg = make_cfg(tiny_disk / "data", map_size_mb=64, max_map_size_mb=64)
    with Agent.open(cfg, catalog) as ag:
        with pytest.raises(StorageFullError, match=r"disk holding .* is full") as info:
            for i in range(1000):
                ag.put("tasks", f"i-{i}", {"route": "route-42", "proof": {"blob": BLOB}})
        assert info.value.map_limit_mb is None
        count = ag.status().pending
        assert count > 10
        assert len(ag.list("tasks")) == count
    with Agent.open(cfg, catalog) as ag:
        assert ag.status().pending == count
        assert ag.get("tasks", "i-0") is not None


def test_growth_by_another_process_is_adopted(tmp_path: Path, catalog: Catalog) -> None:
    """When another process grows the map, this one adopts the new size and carries on."""
    cfg = make_cfg(tmp_path, map_size_mb=1, max_map_size_mb=64)
    with Agent.open(cfg, catalog) as ag:
        ag.put("inspections", "mine", {"vehicle": "v"})
        script = textwrap.dedent(f"""
            from pathlib import Path
            from agent.api import Agent
            from schemas.collection import load_catalog, example_catalog_path
            from waystation.config import AgentConfig
            cfg = AgentConfig.model_validate({{"device_id": "van-1", "data_dir": {str(tmp_path)!r},
                "scopes": ["route-42", "depot-7", "fleet"],
                "storage": {{"map_size_mb": 1, "max_map_size_mb": 64}}}})
            with Agent.open(cfg, load_catalog(example_catalog_path())) as ag:
                for i in range(200):
                    ag.put("tasks", f"o-{{i}}",
                           {{"route": "route-42", "proof": {{"b": "z" * 20000}}}})
                print(ag.store.map_size())
        """)
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             check=True, timeout=120)
        assert int(out.stdout.strip()) > 1 << 20
        assert len(ag.list("tasks")) + len(ag.list("inspections")) == 201
        ag.put("inspections", "after", {"vehicle": "v"})
        assert ag.status().pending == 202


def _raw_data(tmp_path: Path) -> bytes:
    return (tmp_path / "agent.lmdb" / "data.mdb").read_bytes()


def test_values_are_encrypted_at_rest(tmp_path: Path, catalog: Catalog) -> None:
    """With a key file, record values are not in the data file; without, they are."""
    secret = "Secret Street 42, Dock 7"
    plain_dir = tmp_path / "plain"
    with Agent.open(make_cfg(plain_dir), catalog) as ag:
        ag.put("tasks", "t-1", {"route": "route-42", "customer": secret})
    assert secret.encode() in _raw_data(plain_dir)

    key = tmp_path / "key"
    key.write_bytes(os.urandom(32))
    enc_dir = tmp_path / "enc"
    cfg = make_cfg(enc_dir, encryption_key_file=str(key))
    with Agent.open(cfg, catalog) as ag:
        ag.put("tasks", "t-1", {"route": "route-42", "customer": secret})
        ag.put("tasks", "t-1", {"notes": secret + " again"})
    raw = _raw_data(enc_dir)
    assert secret.encode() not in raw
    assert b"Secret" not in raw
    assert b"t-1" in raw, "keys stay plain text (documented)"
    with Agent.open(cfg, catalog) as ag:
        record = ag.get("tasks", "t-1")
        assert record is not None and record.fields["customer"] == secret


def test_wrong_or_missing_key_is_refused(tmp_path: Path, catalog: Catalog) -> None:
    """Opening an encrypted store with another key, or none, fails with a clear error."""
    key = tmp_path / "key"
    key.write_bytes(os.urandom(32))
    data = tmp_path / "data"
    Agent.open(make_cfg(data, encryption_key_file=str(key)), catalog).close()
    other = tmp_path / "other"
    other.write_bytes(os.urandom(32))
    with pytest.raises(EncryptionKeyError, match="is not the key"):
        Agent.open(make_cfg(data, encryption_key_file=str(other)), catalog)
    with pytest.raises(EncryptionKeyError, match="is encrypted"):
        Agent.open(make_cfg(data), catalog)


def test_key_for_plain_store_and_short_key_are_refused(tmp_path: Path, catalog: Catalog) -> None:
    """A key for an unencrypted store, or a key file too short, is refused."""
    data = tmp_path / "data"
    Agent.open(make_cfg(data), catalog).close()
    key = tmp_path / "key"
    key.write_bytes(os.urandom(32))
    with pytest.raises(EncryptionKeyError, match="created without encryption"):
        Agent.open(make_cfg(data, encryption_key_file=str(key)), catalog)
    short = tmp_path / "short"
    short.write_bytes(b"abc")
    with pytest.raises(EncryptionKeyError, match="at least 16"):
        Agent.open(make_cfg(tmp_path / "d2", encryption_key_file=str(short)), catalog)
    with pytest.raises(EncryptionKeyError, match="cannot read"):
        Agent.open(make_cfg(tmp_path / "d3", encryption_key_file=str(tmp_path / "nope")),
                   catalog)
