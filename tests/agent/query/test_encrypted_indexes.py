"""Indexes on a store encrypted at rest: none unless the operator accepts plain-text keys."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.api import Agent
from agent.query import IndexRequired
from schemas.collection import Catalog
from tests.agent.agentkit import make_cfg
from tests.agent.query.checks import assert_indexes_consistent

SECRET = "Secret Customer 42"


def _raw(data_dir: Path) -> bytes:
    return (data_dir / "agent.lmdb" / "data.mdb").read_bytes()


def _key(tmp_path: Path) -> str:
    key = tmp_path / "key"
    key.write_bytes(os.urandom(32))
    return str(key)


def test_encrypted_store_keeps_no_index_and_says_why(tmp_path: Path, catalog: Catalog) -> None:
    """Encrypted and not allowed: no index entry (no plain-text value in the file), and a
    query that needs an index is refused naming storage.plaintext_indexes."""
    data = tmp_path / "data"
    with Agent.open(make_cfg(data, encryption_key_file=_key(tmp_path)), catalog) as ag:
        ag.put("tasks", "t-1", {"route": "route-42", "customer": SECRET, "status": "out"})
        assert ag.indexes() == []
        with pytest.raises(IndexRequired, match=r"storage\.plaintext_indexes = true"):
            ag.query("tasks", where={"customer": SECRET})
        assert [r.key for r in ag.query("tasks").records] == ["t-1"], "key order still works"
    assert SECRET.encode() not in _raw(data)


def test_plaintext_indexes_allowed_on_an_encrypted_store(tmp_path: Path,
                                                         catalog: Catalog) -> None:
    """With plaintext_indexes the indexes are kept and queries work; the indexed value is
    then readable in the file (what the setting accepts), the others stay sealed."""
    data = tmp_path / "data"
    cfg = make_cfg(data, encryption_key_file=_key(tmp_path), plaintext_indexes=True)
    with Agent.open(cfg, catalog) as ag:
        ag.put("tasks", "t-1", {"route": "route-42", "customer": SECRET,
                                "notes": "Sealed Note 7"})
        page = ag.query("tasks", where={"customer": SECRET})
        assert [r.key for r in page.records] == ["t-1"] and page.index == "customer"
        assert_indexes_consistent(ag)
    raw = _raw(data)
    assert SECRET.encode() in raw
    assert b"Sealed Note 7" not in raw
    # Turning the setting off again drops the indexes (LMDB frees their pages; it does
    # not overwrite freed pages at once, so the old bytes may linger in the file).
    key = str(cfg.storage.encryption_key_file)
    with Agent.open(make_cfg(data, encryption_key_file=key), catalog) as ag:
        assert ag.indexes() == []
        assert_indexes_consistent(ag)
