"""The in-place rewrite of encryption at rest (`waystation.atrest.rewrite`), against a
real LMDB environment: whatever the data and the batch size, after a crash after any
batch every value before the marker is in the new form and every value after it in the
old one, and resuming converts each remaining value exactly once."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any
from unittest import mock

import lmdb
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.crypto import ValueCipher
from waystation.atrest import rewrite

NAMES = ("alpha", "beta", "gamma")
C1 = ValueCipher(b"1" * 32)
C2 = ValueCipher(b"2" * 32)
PAIRS = {"on": (None, C1), "off": (C1, None), "swap": (C1, C2)}


class Crash(Exception):
    """Stands in for a kill -9 right after a batch was committed."""


def _seal(cipher: ValueCipher | None, name: str, key: bytes, value: bytes) -> bytes:
    return value if cipher is None else cipher.seal(rewrite.aad(name, key), value)


def _open(cipher: ValueCipher | None, name: str, key: bytes, raw: bytes) -> bytes:
    return raw if cipher is None else cipher.open(rewrite.aad(name, key), raw)


def _env(path: Path) -> rewrite.Env:
    env = lmdb.open(str(path), max_dbs=8, map_size=1 << 20)
    dbs = {n: env.open_db(n.encode()) for n in (*NAMES, "meta")}
    return rewrite.Env(env, dbs, "meta", b"marker", 64 << 20)


def _contents(target: rewrite.Env) -> dict[str, dict[bytes, bytes]]:
    with target.env.begin() as txn:
        return {n: {bytes(k): bytes(v) for k, v in txn.cursor(db=target.dbs[n])}
                for n in NAMES}


tables = st.dictionaries(st.binary(min_size=1, max_size=6), st.binary(max_size=30), max_size=25)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.fixed_dictionaries({n: tables for n in NAMES}),
       batch=st.integers(1, 7), crash_after=st.integers(1, 12),
       pair=st.sampled_from(sorted(PAIRS)))
def test_crash_after_any_batch_then_resume(data: dict[str, dict[bytes, bytes]], batch: int,
                                           crash_after: int, pair: str) -> None:
    """The marker splits old from new exactly; resuming finishes with every value
    converted once (sealing twice, or opening a new value as old, would fail)."""
    old, new = PAIRS[pair]
    with tempfile.TemporaryDirectory() as tmp:
        target = _env(Path(tmp))
        try:
            with target.env.begin(write=True) as txn:
                for name, rows in data.items():
                    for key, value in rows.items():
                        txn.put(key, _seal(old, name, key, value), db=target.dbs[name])
            rewrite.start(target, {"from": "a", "to": "b"})
            calls = 0

            def kill(point: str) -> None:
                nonlocal calls
                calls += 1
                if calls >= crash_after:
                    raise Crash

            try:
                with mock.patch.object(rewrite, "kill_point", kill):
                    rewrite.convert(target, NAMES, old, new, batch=batch)
            except Crash:
                pass
            marker = rewrite.read_marker(target)
            assert marker is not None
            after = None if marker["after"] is None else bytes.fromhex(marker["after"])
            for i, (name, rows) in enumerate(_contents(target).items()):
                for key, raw in rows.items():
                    done = i < marker["db"] or (i == marker["db"] and after is not None
                                                and key <= after)
                    cipher = new if done else old
                    assert _open(cipher, name, key, raw) == data[name][key]
            rewrite.convert(target, NAMES, old, new, batch=batch)
            final = rewrite.read_marker(target)
            assert final is not None and final["db"] == len(NAMES)
            assert final["done"] == sum(len(rows) for rows in data.values())
            for name, rows in _contents(target).items():
                assert {k: _open(new, name, k, v) for k, v in rows.items()} == data[name]
        finally:
            target.env.close()


def test_a_value_sealed_for_another_key_does_not_open(tmp_path: Path) -> None:
    """A sealed value copied to another key (or table) is refused, not converted."""
    target = _env(tmp_path)
    try:
        with target.env.begin(write=True) as txn:
            txn.put(b"k2", C1.seal(rewrite.aad("alpha", b"k1"), b"v"), db=target.dbs["alpha"])
        rewrite.start(target, {})
        with pytest.raises(Exception, match="does not decrypt"):
            rewrite.convert(target, NAMES, C1, None)
        marker: dict[str, Any] | None = rewrite.read_marker(target)
        assert marker is not None and marker["done"] == 0  # nothing half-written
        with target.env.begin() as txn:
            assert orjson.loads(txn.get(b"marker", db=target.dbs["meta"]))["db"] == 0
    finally:
        target.env.close()


@pytest.mark.parametrize("content", [b"", b"\xff\xfe garbage", b"[1, 2]", b'{"op": "rm -rf"}'])
def test_a_damaged_sentinel_still_blocks_the_store(tmp_path: Path, content: bytes) -> None:
    """A sentinel that is empty, not JSON or names an unknown operation still marks a
    conversion under way (the stores refuse to open), naming a real command."""
    from waystation.atrest import files

    assert files.pending(tmp_path) is None
    (tmp_path / files.PENDING).write_bytes(content)
    assert files.pending(tmp_path) == "encrypt"
    files.mark_pending(tmp_path, "decrypt")
    assert files.pending(tmp_path) == "decrypt"
    files.clear_pending(tmp_path)
    assert files.pending(tmp_path) is None
