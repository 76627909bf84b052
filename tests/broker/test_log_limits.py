"""broker.embedded.log_limits.RepeatFilter on plain stdlib loggers, with a fake clock."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from broker.embedded.log_limits import RepeatFilter, install, kind_of, uninstall


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def texts(self) -> list[str]:
        return [str(r.msg) if isinstance(r.msg, dict) else r.getMessage() for r in self.records]


NAMES = ("test.amqtt.like", "test.ours")


@pytest.fixture
def setup() -> Iterator[tuple[RepeatFilter, _Clock, _Lines]]:
    """A RepeatFilter (60 s, 3 lines of a kind overall) on two loggers, and what they wrote."""
    clock = _Clock()
    repeat = install(NAMES, RepeatFilter(60.0, kind_max=3, clock=clock))
    lines = _Lines()
    for name in NAMES:
        logger = logging.getLogger(name)
        logger.addHandler(lines)
        logger.propagate = False
        logger.setLevel(logging.DEBUG)
    yield repeat, clock, lines
    uninstall(repeat, NAMES)
    for name in NAMES:
        logging.getLogger(name).removeHandler(lines)
        logging.getLogger(name).propagate = True


def _amqtt_warning(client: str, packet_id: int) -> None:
    adapter = logging.LoggerAdapter(logging.getLogger(NAMES[0]), {"client_id": client})
    adapter.warning(f"Received PUBACK for unknown pending message Id: '{packet_id}'")


def test_one_line_per_client_and_kind_per_window_then_the_count(
        setup: tuple[RepeatFilter, _Clock, _Lines]) -> None:
    """The first line of a kind from a client passes, its repeats are counted and said once
    at the end of the window, with the last one's text; another client is not held back."""
    repeat, clock, lines = setup
    for i in range(500):
        _amqtt_warning("van-12", i)
    _amqtt_warning("van-7", 1)
    assert lines.texts() == ["Received PUBACK for unknown pending message Id: '0'",
                             "Received PUBACK for unknown pending message Id: '1'"]
    clock.now += 61
    repeat.flush()
    assert lines.texts()[2:] == ["Received PUBACK for unknown pending message Id: '499' "
                                 "(499 more like it in the last 60 s)"]
    assert lines.records[2].client_id == "van-12"  # type: ignore[attr-defined]
    repeat.flush()  # said once
    assert len(lines.records) == 3


def test_a_flood_without_pause_costs_one_line_per_window(
        setup: tuple[RepeatFilter, _Clock, _Lines]) -> None:
    """A client repeating itself for 10 windows writes a line per window, all counted."""
    repeat, clock, lines = setup
    for _ in range(10):
        for i in range(100):
            _amqtt_warning("van-12", i)
            clock.now += 0.6
    repeat.flush(clock.now + 61)
    assert len(lines.records) <= 11
    counts = [int(t.split("(")[1].split()[0]) if "more like it" in t else 1
              for t in lines.texts()]
    assert sum(counts) == 1000


def test_all_clients_together_get_kind_max_lines(
        setup: tuple[RepeatFilter, _Clock, _Lines]) -> None:
    """Many clients with one kind of line: kind_max lines, then one counting the rest and
    how many clients they came from."""
    repeat, _, lines = setup
    for n in range(50):
        _amqtt_warning(f"van-{n}", 1)
    assert len(lines.records) == 3
    repeat.close()
    assert lines.texts()[3] == ("Received PUBACK for unknown pending message Id: '1' "
                                "(47 more like it from 47 clients in the last 60 s)")


def test_structured_events_get_the_count_as_keys(
        setup: tuple[RepeatFilter, _Clock, _Lines]) -> None:
    """Our structlog events (a dict message) keep their keys and get more_like_it."""
    repeat, _, lines = setup
    logger = logging.getLogger(NAMES[1])
    for _ in range(5):
        logger.info({"event": "acl denied", "user": "van-12", "topic": "waystation/van-7/up"})
    repeat.close()
    assert [r.msg for r in lines.records] == [
        {"event": "acl denied", "user": "van-12", "topic": "waystation/van-7/up"},
        {"event": "acl denied", "user": "van-12", "topic": "waystation/van-7/up",
         "more_like_it": 4, "in_last_s": 60.0}]


def test_lines_no_client_causes_pass(setup: tuple[RepeatFilter, _Clock, _Lines]) -> None:
    """Our own info events that name no client (start, stop) are never held back."""
    _, _, lines = setup
    logger = logging.getLogger(NAMES[1])
    for _ in range(10):
        logger.info({"event": "embedded broker listening", "port": 1883})
    assert len(lines.records) == 10


def test_the_kind_ignores_names_and_numbers() -> None:
    """Packet ids, addresses and quoted names do not make a new kind."""
    def rec(msg: str) -> logging.LogRecord:
        return logging.makeLogRecord({"name": "amqtt.broker", "msg": msg})

    assert kind_of(rec("no CONNECT from 10.0.0.1:5555 within 15 s")) == \
        kind_of(rec("no CONNECT from 10.0.0.2:6000 within 15 s"))
    assert kind_of(rec("Task failed: <Task 0x7f12 'x'>")) == kind_of(rec("Task failed: <T>"))


def test_all_kinds_together_are_bounded(setup: tuple[RepeatFilter, _Clock, _Lines],
                                        caplog: pytest.LogCaptureFixture) -> None:
    """Kinds hidden in text (a new one per line) still get total_max lines a window, then
    one line counting the rest."""
    repeat, _, lines = setup
    repeat.total_max = 5
    logger = logging.getLogger(NAMES[0])
    with caplog.at_level(logging.WARNING):
        for n in range(100):
            logger.warning("kind %s", "abcdefghijklmnopqrstuvwxyz"[n % 26] * (n // 26 + 1))
        assert len(lines.records) == 5
        repeat.close()
    assert [r.getMessage() for r in caplog.records
            if r.name == "broker.embedded.log_limits"] == [
        "95 more lines about clients held back in the last 60 s (the broker writes at most "
        "5 a window; the last: kind vvvv)"]


def test_a_line_with_bad_arguments_does_not_raise_into_the_caller(
        setup: tuple[RepeatFilter, _Clock, _Lines]) -> None:
    """The filter runs inside amqtt's protocol code: a line whose arguments do not fit
    its format is let through (the handler reports it), never raised to amqtt."""
    _, _, lines = setup
    record = logging.makeLogRecord({"name": NAMES[0], "msg": "id %d", "args": ("x",),
                                    "levelno": logging.WARNING})
    assert logging.getLogger(NAMES[0]).filter(record)
    assert lines.records == []
