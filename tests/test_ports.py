"""tests/ports.py: the ports test servers get are below the ephemeral range, disjoint
between xdist workers, and never one something already listens on."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests import ports
from tests.ports import LOWEST, MIN_BLOCK, PortAllocator, bindable, free_port, worker_block


@given(st.integers(LOWEST, 65536), st.integers(1, 64), st.data())
def test_worker_blocks_are_disjoint_and_below_the_ephemeral_range(
    ephemeral_low: int, workers: int, data: st.DataObject
) -> None:
    """Every worker's block lies in [LOWEST, ephemeral_low), has MIN_BLOCK ports at least,
    and no two workers' blocks share a port; without room, no worker gets one."""
    blocks = [worker_block(ephemeral_low, w, workers) for w in range(workers)]
    if (ephemeral_low - LOWEST) // workers < MIN_BLOCK:
        assert blocks == [None] * workers
        return
    seen: set[int] = set()
    for block in blocks:
        assert block is not None and len(block) >= MIN_BLOCK
        assert block.start >= LOWEST and block.stop <= ephemeral_low
        assert seen.isdisjoint(block)
        seen.update(block)
    worker = data.draw(st.integers(0, workers - 1))
    assert worker_block(ephemeral_low, worker, workers) == blocks[worker]


@pytest.mark.parametrize("worker,workers", [(-1, 2), (2, 2), (0, 0), (0, -3)])
def test_worker_block_refuses_a_worker_outside_the_count(worker: int, workers: int) -> None:
    """A worker index outside 0..workers-1 (or no workers) is a ValueError, not a block."""
    with pytest.raises(ValueError):
        worker_block(30000, worker, workers)


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A socket listening on a port of this run's block."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", free_port()))
    sock.listen()
    yield sock
    sock.close()


def test_allocator_skips_a_port_in_use_and_wraps_around(listener: socket.socket) -> None:
    """A port something listens on is never handed out; the next one is, and after the
    end of the block the allocator starts again at its beginning."""
    busy = listener.getsockname()[1]
    allocator = PortAllocator(range(busy, busy + 2), 0)
    assert not bindable("127.0.0.1", busy)
    first = allocator.take()
    assert first == busy + 1
    assert allocator.take() == busy + 1  # wrapped, skipping `busy` again


def test_allocator_with_every_port_taken_says_so(listener: socket.socket) -> None:
    """A block whose every port is in use raises, naming the block, instead of looping."""
    busy = listener.getsockname()[1]
    with pytest.raises(RuntimeError, match=f"no free port in {busy}-{busy}"):
        PortAllocator(range(busy, busy + 1), 5).take()


def test_allocator_refuses_an_empty_block() -> None:
    """An empty block is a ValueError at construction."""
    with pytest.raises(ValueError):
        PortAllocator(range(20000, 20000), 0)


def test_free_port_is_bindable_distinct_and_outside_the_ephemeral_range() -> None:
    """Ports in succession are distinct, bindable and none comes from the kernel's
    ephemeral range (where any outgoing connection could take it first)."""
    low = ports._ephemeral_low()
    got = [free_port() for _ in range(20)]
    assert len(set(got)) == len(got)
    assert all(bindable("127.0.0.1", p) for p in got)
    assert all(LOWEST <= p < low for p in got)


@pytest.mark.parametrize("worker,count", [
    ("gw1", "3"), ("", "1"), ("gw7", "2"), ("gwx", "2"), ("master", "x"), ("gw0", "0"),
])
def test_worker_from_environment(monkeypatch: pytest.MonkeyPatch, worker: str,
                                 count: str) -> None:
    """gwN of a valid count is worker N; anything malformed is taken as the only worker."""
    monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", count)
    expected = (1, 3) if worker == "gw1" else (0, 1)
    assert ports._this_worker() == expected
