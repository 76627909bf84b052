"""What the embedded broker queues for a persistent session whose client is away is
bounded (broker.embedded.session_queue): by a real broker with small limits, and the
admission and replay rules on their own."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest

from broker.embedded.amqtt_handler import KeepaliveHandler
from broker.embedded.packet_limit import LimitedReader
from broker.embedded.session_queue import REPLAY_WINDOW, QueueLimits, SessionQueues
from tests.fixtures_brokers import PREFIX, SERVER_USER, USERS, BrokerProcess, start_embedded
from tests.helpers import RecordingClient, wait_for_progress, wait_until

UP = f"{PREFIX}/van-12/up"
STATUS = f"{PREFIX}/van-12/status"


@pytest.fixture
def small_broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    """An embedded broker that keeps at most 50 messages or 1 MiB per away session."""
    proc = start_embedded(tmp_path / "broker", extra_args=[
        "--max-queued-messages", "50", "--max-queued-mb", "1"])
    yield proc
    proc.stop()


def _server(broker: BrokerProcess) -> RecordingClient:
    srv = RecordingClient(broker.port, "merge-1", SERVER_USER, USERS[SERVER_USER],
                          clean_session=False)
    assert srv.connect() == "Success"
    return srv


def _flood(broker: BrokerProcess, payloads: list[bytes], *, marker: bytes | None = None
           ) -> None:
    """A device publishes every payload on its up topic (each PUBACKed), then `marker`
    on its status topic, and leaves."""
    dev = RecordingClient(broker.port, "van-12", "van-12", USERS["van-12"])
    assert dev.connect() == "Success"
    try:
        infos = [dev.client.publish(UP, p, qos=1) for p in payloads]
        if marker is not None:
            infos.append(dev.client.publish(STATUS, marker, qos=1))
        wait_until(lambda: all(i.mid in dev.state.pubacks for i in infos), 60,
                   message="every PUBACK")
    finally:
        dev.close()


@pytest.mark.parametrize(("size", "count", "kept"), [
    (100, 500, 50),              # the message bound
    (100_000, 30, 10),           # the byte bound: ten 100 kB payloads fit in 1 MiB
], ids=["messages", "bytes"])
def test_a_flood_while_the_server_is_away_is_bounded(
        small_broker: BrokerProcess, size: int, count: int, kept: int) -> None:
    """The server's persistent session subscribes to the devices' up topics and leaves;
    a device publishes while it is away. The device gets every PUBACK, the broker keeps
    the first messages up to its limit, and the server gets exactly those when back
    (without the retain flag), then live messages as before."""
    srv = _server(small_broker)
    assert srv.subscribe(f"{PREFIX}/+/up") == 1
    srv.close()
    # A clean session that stays, on the device's status topic only: the broker routes
    # one client's messages in order, so once the marker sent after the flood reaches
    # it, the broker has handled every message of the flood for the away session too.
    # (Watching the flood itself, the watcher was under the same small per-client bound:
    # lagging 50 behind on a loaded machine, it was dropped messages and waited in vain.)
    watcher = RecordingClient(small_broker.port, "watcher", SERVER_USER, USERS[SERVER_USER])
    assert watcher.connect() == "Success" and watcher.subscribe(STATUS) == 1
    payloads = [i.to_bytes(4, "big") + b"x" * (size - 4) for i in range(count)]
    try:
        _flood(small_broker, payloads, marker=b"flood sent")
        watcher.wait_for(STATUS, b"flood sent", timeout=30)
    finally:
        watcher.close()
    back = _server(small_broker)
    try:
        assert back.state.session_present == [True]
        wait_until(lambda: len(back.received(UP)) >= kept, 30, message=f"{kept} queued")
        _flood(small_broker, [b"live"])
        back.wait_for(UP, b"live")
        got = back.received(UP)
        assert [m.payload for m in got] == [*payloads[:kept], b"live"]
        assert not any(m.retain for m in got)
    finally:
        back.close()
    assert "client queue full" in small_broker.log_path.read_text()


def _pid(broker: BrokerProcess) -> int:
    assert broker.proc is not None
    return broker.proc.pid


def _rss_mb(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss) / (1 << 20)


def _settled_rss_mb(pid: int, *, deadline_s: float = 30.0) -> float:
    """The broker's RSS once it has stopped moving (two readings 1 s apart within 1 MB):
    a PUBACK comes when a message is read, its routing (kept or dropped) after it, so a
    reading taken at the last PUBACK counts messages still on their way (seen in CI:
    65 MB, then 103 MB a flood later, where a settled reading gives ~97 both times)."""
    end = time.monotonic() + deadline_s
    last = _rss_mb(pid)
    while time.monotonic() < end:
        time.sleep(1.0)
        now = _rss_mb(pid)
        if abs(now - last) < 1.0:
            return now
        last = now
    return last


def test_a_flood_to_a_server_that_does_not_read_stays_bounded(
        small_broker: BrokerProcess) -> None:
    """The merge server is connected but reads nothing (stuck); a device publishes 4 x 100
    MB. The device gets its PUBACKs, the broker drops what is over the server's limit (1
    MiB here): after the first 200 MB it stops growing (stock amqtt held all of it: +104
    MB per 100 MB), and once the server reads again it gets messages as before. (The first
    200 MB grow it by ~55 MB here, its allocator's arenas and the bounded queue filling, a
    figure that varied from 25 to 52 MB for the first 100 MB between runs: what is
    measured is that it stops growing: the next 200 MB move it by -12 to +19 MB, read once
    it has settled after each flood.)"""
    srv = _server(small_broker)
    assert srv.subscribe(f"{PREFIX}/+/up") == 1
    srv.client.loop_stop()  # connected, reading nothing
    before = _rss_mb(_pid(small_broker))
    dev = RecordingClient(small_broker.port, "van-12", "van-12", USERS["van-12"])
    assert dev.connect() == "Success"

    def flood_100_mb() -> float:
        for _ in range(10):
            infos = [dev.client.publish(UP, b"x" * 50_000, qos=1) for _ in range(200)]
            wait_until(lambda sent=infos: all(i.mid in dev.state.pubacks for i in sent), 120,
                       message="the device's PUBACKs")
            dev.state.pubacks.clear()
        return _settled_rss_mb(_pid(small_broker))

    try:
        rss = [flood_100_mb() for _ in range(4)]
        print(f"broker RSS {before:.0f} MB, then after each 100 MB {[round(r) for r in rss]}")
        assert rss[1] - before < 100, f"the broker grew by {rss[1] - before:.0f} MB for 200 MB"
        # Held messages would show as ~+200 MB here (stock amqtt: +104 MB per 100 MB);
        # settled readings of a bounded broker still move by up to ~20 MB between floods
        # (allocator arenas: [69, 69, 69, 88] and [85, 73, 93, 86] in two runs of one
        # build), so the bound is a fifth of what was sent, not 15 MB.
        assert rss[3] - rss[1] < 40, (f"the broker grew by {rss[3] - rss[1]:.0f} MB more for "
                                      "the third and fourth 100 MB")
        srv.client.loop_start()
        dev.client.publish(UP, b"after", qos=1)
        srv.wait_for(UP, b"after", timeout=60)
    finally:
        dev.close()
        srv.close()
    assert "client queue full" in small_broker.log_path.read_text()


def test_what_a_client_sent_before_it_left_is_routed(
        embedded_broker: BrokerProcess) -> None:
    """A device publishes 500 messages and disconnects at once, while routing is slow
    (the server's session is away and keeps everything): every message it got a PUBACK
    for reaches the connected watcher and the away server. Stock amqtt left what was not
    routed yet in the device's session (routed at its next connection, or never)."""
    srv = _server(embedded_broker)
    assert srv.subscribe(f"{PREFIX}/+/up") == 1
    srv.close()
    watcher = RecordingClient(embedded_broker.port, "watcher", SERVER_USER,
                              USERS[SERVER_USER])
    assert watcher.connect() == "Success" and watcher.subscribe(UP) == 1
    payloads = [i.to_bytes(4, "big") + b"x" * 96 for i in range(500)]
    try:
        _flood(embedded_broker, payloads)
        # (Failed once at load 6.7 with a tail of the flood never routed: amqtt's
        # session monitor emptied the device's session; test_embedded_leaving.)
        wait_for_progress(lambda: len(watcher.received(UP)), len(payloads), idle_s=30,
                          message="every message routed to the watcher")
    finally:
        watcher.close()
    back = _server(embedded_broker)
    try:
        wait_for_progress(lambda: len(back.received(UP)), len(payloads), idle_s=30,
                          message="every message kept for the away server")
        assert sorted(m.payload for m in back.received(UP)) == payloads
    finally:
        back.close()


class _Session:
    def __init__(self, client_id: str = "van-12") -> None:
        self.client_id = client_id
        self.attributes: dict[str, Any] = {}
        self.retained_messages: asyncio.Queue[Any] = asyncio.Queue()


class _Msg:
    def __init__(self, data: bytes) -> None:
        self.topic, self.data, self.qos = UP, data, 1


def _queue(queues: SessionQueues, session: _Session, data: bytes) -> bool:
    if not queues.admit(session, len(data)):
        return False
    session.retained_messages.put_nowait(_Msg(data))
    return True


def test_admission_counts_messages_and_bytes_and_replay_starts_afresh() -> None:
    queues = SessionQueues(QueueLimits(messages=3, bytes=250))
    s = _Session()
    assert [_queue(queues, s, b"x" * 100) for _ in range(3)] == [True, True, False]
    assert _queue(queues, s, b"x" * 50)
    assert not _queue(queues, s, b"x")  # three messages now

    class Handler:
        sent: list[tuple[bytes, bool]] = []

        async def mqtt_publish(self, topic: str, data: bytes, qos: int, retain: bool) -> None:
            self.sent.append((data, retain))

    handler = Handler()
    asyncio.run(queues.replay(s, handler))
    assert [len(d) for d, _ in handler.sent] == [100, 100, 50]
    assert not any(r for _, r in handler.sent)
    assert [_queue(queues, s, b"x" * 100) for _ in range(3)] == [True, True, False]


def test_the_replay_keeps_a_bounded_window_in_flight() -> None:
    queues = SessionQueues(QueueLimits())
    s = _Session()
    for i in range(REPLAY_WINDOW * 3):
        assert _queue(queues, s, i.to_bytes(4, "big"))
    most = 0

    class Handler:
        flying = 0
        order: list[bytes] = []

        async def mqtt_publish(self, topic: str, data: bytes, qos: int, retain: bool) -> None:
            nonlocal most
            self.flying += 1
            most = max(most, self.flying)
            self.order.append(data)
            await asyncio.sleep(0)
            self.flying -= 1
            if data == (7).to_bytes(4, "big"):
                raise ConnectionError("the client left mid-replay")

    asyncio.run(queues.replay(s, Handler()))
    assert most <= REPLAY_WINDOW and len(Handler.order) == REPLAY_WINDOW * 3


def test_drops_are_said_once_a_minute_per_client(capsys: pytest.CaptureFixture[str]) -> None:
    now = [0.0]
    queues = SessionQueues(QueueLimits(messages=1, bytes=1 << 20), clock=lambda: now[0])
    s = _Session()
    assert _queue(queues, s, b"a")
    for _ in range(5):
        assert not _queue(queues, s, b"b")
    now[0] = 61.0
    assert not _queue(queues, s, b"c")
    said = [line for line in capsys.readouterr().out.splitlines() if "queue full" in line]
    assert len(said) == 2 and "dropped=5" in said[1].replace(" ", "").replace("'", "")


def test_a_client_is_held_back_between_packets_while_there_is_no_room() -> None:
    """The broker reads nothing more of a client while its messages wait to be routed:
    held at the next packet's first byte, never inside a packet."""
    room = [False]

    async def main() -> None:
        stream = asyncio.StreamReader()
        reader = LimitedReader(stream, 1000, "peer")
        reader.room = lambda: room[0]
        stream.feed_data(b"\x30\x03abc" * 2)
        first = asyncio.ensure_future(reader.read(1))
        await _until(lambda: reader.holding)
        assert not first.done()
        room[0] = True
        assert await first == b"\x30" and not reader.holding
        room[0] = False
        assert await reader.read(1) == b"\x03"      # inside the packet: read on
        assert await reader.read(3) == b"abc"
        second = asyncio.ensure_future(reader.read(1))
        await _until(lambda: reader.holding)
        assert not second.done()
        room[0] = True
        assert await second == b"\x30"
        # The keepalive timer runs out during a hold (amqtt wraps the read in wait_for):
        # the hold is still what the reader says when the timeout is handled.
        room[0] = False
        assert await reader.read(1) == b"\x03"
        assert await reader.read(3) == b"abc"
        try:
            await asyncio.wait_for(reader.read(1), timeout=0.05)
            raise AssertionError("read while there was no room")
        except TimeoutError:
            assert reader.holding
        room[0] = True
        stream.feed_data(b"\xc0\x00")
        assert await reader.read(1) == b"\xc0" and not reader.holding

    asyncio.run(main())


async def _until(cond: Any) -> None:
    for _ in range(1000):
        if cond():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


def test_a_client_held_back_is_not_taken_for_silent() -> None:
    """The keepalive timer runs out while the broker holds a client's packets back: the
    client is not disconnected (it is not silent); without the hold it is."""
    aborted: list[bool] = []

    class Transport:
        def abort(self) -> None:
            aborted.append(True)

    handler = KeepaliveHandler.__new__(KeepaliveHandler)
    handler.session = None
    handler.writer = SimpleNamespace(_writer=SimpleNamespace(transport=Transport()))
    handler.reader = SimpleNamespace(holding=True)
    handler.handle_read_timeout()
    assert aborted == []
    handler.reader = SimpleNamespace(holding=False)
    handler.handle_read_timeout()
    assert aborted == [True]
