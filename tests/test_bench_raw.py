"""The benchmarks' raw LMDB baseline writes the way the agent writes (bench/raw.py), and
the high-entropy record generator is what it says (bench/device.py)."""

from __future__ import annotations

import re
import zlib
from pathlib import Path

import orjson

from bench.device import record, record_high_entropy
from bench.raw import AGENT_LMDB_FLAGS

ROOT = Path(__file__).resolve().parent.parent


def test_raw_lmdb_baseline_uses_the_agents_open_flags() -> None:
    source = (ROOT / "agent" / "store.py").read_text()
    [call] = re.findall(r"lmdb\.open\((.*?)\)\n", source, re.DOTALL)
    for flag, value in AGENT_LMDB_FLAGS.items():
        assert re.search(rf"\b{flag}={value}\b", call), (flag, value, call)


def test_high_entropy_records_compress_far_worse_at_the_same_size() -> None:
    def sizes(make: object) -> tuple[int, int]:
        raw = b"".join(orjson.dumps(make("r1", i)) for i in range(200))  # type: ignore[operator]
        return len(raw), len(zlib.compress(raw))

    text_raw, text_z = sizes(record)
    rand_raw, rand_z = sizes(record_high_entropy)
    assert 0.8 < rand_raw / text_raw < 1.25           # about the same size
    assert rand_z > 1.8 * text_z                       # but compresses far worse
    assert record_high_entropy("r1", 7) == record_high_entropy("r1", 7)   # seeded
