"""Dead letters of a flood: the first ones kept whole, the rest counted (letter_gate)."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from broker.server.letter_gate import OVERFLOW_DEVICE, GateLimits, LetterGate
from broker.server.store.base import DeadLetter, Store
from tests.server.conftest import StoreFactory
from tests.server.helpers import T0, by_device, errors, make_engine

LIMITS = GateLimits(keep_first=3, window_ms=1000, raw_bytes=10, max_keys=4)


def refusal(t: int, dev: str = "van-1", code: str = "malformed", size: int = 20
            ) -> DeadLetter:
    return DeadLetter(0, t, dev, "up", code, f"bad at {t}", b"r" * size, size)


@given(st.lists(st.tuples(st.integers(0, 400), st.sampled_from(["van-1", "van-2", "van-3",
                                                                  "van-4", "van-5"]),
                          st.sampled_from(["malformed", "too_large"])), max_size=200))
@settings(max_examples=200, deadline=None)
def test_every_refusal_is_kept_or_counted_exactly_once(script: list[tuple[int, str, str]]
                                                       ) -> None:
    """Each refusal is either kept (raw cut to raw_bytes, size kept) or counted in exactly
    one summary; per group and window at most keep_first are kept."""
    gate = LetterGate(LIMITS)
    stored: list[DeadLetter] = []
    t = 0
    for step, dev, code in script:
        t += step
        session = gate.session()
        stored.extend(session.admit(refusal(t, dev, code)))
        gate.commit(session)
    stored.extend(gate.due(t, everything=True))
    kept = [d for d in stored if d.raw]
    summaries = [d for d in stored if not d.raw]
    counted = sum(int(d.reason.split(" ", 1)[0]) for d in summaries)
    assert len(kept) + counted == len(script) == gate.seen
    assert (gate.kept, gate.counted) == (len(kept), counted)
    assert all(len(d.raw) == LIMITS.raw_bytes and d.size == 20 for d in kept)
    assert not gate.windows
    devices = {d.device for d in stored}
    assert len(devices - {OVERFLOW_DEVICE}) <= 5


def test_flood_keeps_the_first_then_one_summary_per_window() -> None:
    """1,000 identical refusals in one window: 3 letters kept, then one summary that
    counts the other 997 and their bytes when the window ends."""
    gate = LetterGate(LIMITS)
    stored: list[DeadLetter] = []
    for i in range(1000):
        session = gate.session()
        stored.extend(session.admit(refusal(100 + i % 500)))
        gate.commit(session)
    assert [d.reason for d in stored] == ["bad at 100", "bad at 101", "bad at 102"]
    assert gate.due(1099) == []
    (summary,) = gate.due(1100)
    assert summary.reason.startswith("997 more malformed refusal(s) from van-1")
    assert "(19940 bytes in all)" in summary.reason and "first reason: bad at 103" in summary.reason
    assert summary.raw == b"" and summary.code == "malformed" and summary.device == "van-1"
    # the next window starts afresh
    session = gate.session()
    assert len(session.admit(refusal(2000))) == 1


def test_a_rerun_transaction_decides_the_same_and_counts_once() -> None:
    """Sessions change nothing until commit: a retried transaction admits the same."""
    gate = LetterGate(LIMITS)
    first = gate.session()
    a = [first.admit(refusal(i)) for i in range(5)]
    again = gate.session()  # the store ran the transaction again
    b = [again.admit(refusal(i)) for i in range(5)]
    assert a == b and gate.seen == 0
    gate.commit(again)
    assert (gate.seen, gate.kept, gate.counted) == (5, 3, 2)


def test_a_window_ending_inside_a_session_yields_its_summary() -> None:
    """A refusal after its group's window ended brings that window's summary along."""
    gate = LetterGate(LIMITS)
    session = gate.session()
    for i in range(5):
        session.admit(refusal(i))
    out = session.admit(refusal(1500))
    assert [bool(d.raw) for d in out] == [False, True]
    assert out[0].reason.startswith("2 more malformed")


def test_new_devices_past_max_keys_share_one_group() -> None:
    """Past max_keys groups, new devices' refusals share an overflow group per code."""
    gate = LetterGate(LIMITS)
    session = gate.session()
    for i in range(20):
        session.admit(refusal(0, dev=f"van-{i}"))
    gate.commit(session)
    assert len(gate.windows) == LIMITS.max_keys + 1
    (summary,) = [d for d in gate.due(5000) if d.device == OVERFLOW_DEVICE]
    assert summary.reason.startswith("13 more malformed refusal(s) from devices beyond")


def test_engine_flood_of_identical_refusals_writes_few_dead_letters(
        tmp_path: Path, store_factory: StoreFactory) -> None:
    """A device sending 500 malformed messages is answered 500 times, but the store gets
    the first keep_first letters and, at the next tick after the window, one summary."""
    engine, store, time = make_engine(tmp_path, {"van-1": ["r1"]}, store=store_factory())
    answers = 0
    for i in range(500):
        out = by_device(engine.handle_many([("van-1", b"not json %d" % i)]))
        answers += len(errors(out["van-1"]))
    assert answers == 500
    letters = _letters(store)
    assert len(letters) == engine.config.dead_letters.keep_first == 10
    assert [d.raw for d in letters[::-1]] == [b"not json %d" % i for i in range(10)]
    time.now = T0 + engine.config.dead_letters.window_s * 1000
    engine.tick()
    letters = _letters(store)
    assert len(letters) == 11 and letters[0].reason.startswith("490 more malformed")
    assert engine.counters["dead_letters"] == 500
    assert engine.counters["dead_letters_counted"] == 490


def test_engine_refused_at_intake_answers_too_large_and_keeps_the_size(
        tmp_path: Path, store_factory: StoreFactory) -> None:
    """A payload the intake refused (only its head kept) is answered too_large and kept
    as a dead letter with its full size."""
    engine, store, _ = make_engine(tmp_path, {"van-1": ["r1"]}, store=store_factory())
    out = by_device(engine.handle_refused("van-1", "up", b"{" * 100, 300_000))
    (err,) = errors(out["van-1"])
    assert err["code"] == "too_large" and "300000 bytes" in err["reason"]
    # a status is answered too (§7.10), prefixed as every status answer
    (status_err,) = errors(by_device(engine.handle_refused("van-1", "status", b"{",
                                                           300_000))["van-1"])
    assert status_err["code"] == "too_large"
    assert status_err["reason"].startswith("status message: payload of 300000 bytes")
    # an unregistered device's status is kept, not answered (no one to tell)
    assert engine.handle_refused("nobody", "status", b"{", 300_000) == []
    assert engine.handle_refused("+/x", "up", b"{", 300_000) == []
    engine.tick()
    letters = _letters(store)
    assert [(d.device, d.topic, d.code, d.size) for d in letters] == [
        ("van-1", "up", "too_large", 300_000), ("van-1", "status", "too_large", 300_000),
        ("nobody", "status", "too_large", 300_000), ("+/x", "up", "too_large", 300_000)
    ][::-1]
    assert letters[-1].raw == b"{" * 100


def _letters(store: Store) -> list[DeadLetter]:
    with store.read() as txn:
        return txn.dead_letters(1000)
