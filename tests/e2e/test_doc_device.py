"""An outside device author's acceptance run: a device written from docs/PROTOCOL.md and
schemas/json/ alone (tests/e2e/doc_device.py, plain paho-mqtt) against the embedded
broker and a real merge server, driven by the operator's CLI as deploy/README.md says.

Each test checks what the document promises a device, section by section, including the
hostile-but-legal edges it allows (sizes at their limits, Unicode where identifiers may
hold it, duplicates after a reconnect). One fleet serves the module: each test has its
own devices and scopes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.doc_device import DocDevice
from tests.e2e.fleet import Fleet

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    f = Fleet(tmp_path_factory.mktemp("docdev"), "embedded", "lmdb")
    try:
        f.start()
        yield f
    finally:
        f.close()


def device(fleet: Fleet, dev: str, scope: str, *, caps: list[str] | None = None,
           hello: bool = True) -> DocDevice:
    """Enrol `dev` on `scope` (`waystation device add`), connect it as §1 says (online
    status first) and send its `hello`; with `caps`, wait for the `welcome`."""
    fleet.add_device(dev, [scope])
    d = DocDevice(dev, fleet.passwords[dev], fleet.port, scopes=[scope])
    d.connect()
    if hello:
        start = d.mark()
        d.hello(caps=caps)
        if caps is not None:
            d.wait_for(lambda m: m["type"] == "welcome", start=start, what="welcome")
    return d


def cli(fleet: Fleet, *args: str) -> None:
    fleet.cli("device", *args, "--config", str(fleet.server_config))


def test_hello_changes_and_every_promised_rejection(fleet: Fleet) -> None:
    """§7.1/§7.11 hello → welcome; §7.2/§7.4 changes → ack; §7.5/§8 the codes a device
    is promised for bad input, each change judged on its own; §2/§3 limits at the edge."""
    a = device(fleet, "doc-a1", "doc-r1", caps=["sync", "no_such_feature"])
    welcome = a.of_type("welcome")[0]
    assert welcome["caps"] == ["sync"]  # §11: only what both speak; unknown ones dropped

    # Legal edges: a key of exactly 200 UTF-8 bytes (Unicode), Unicode values and set
    # members, a field value nested exactly 32 levels deep.
    deep: object = 1
    for _ in range(31):
        deep = [deep]
    legal = [a.change("tasks", "é" * 100, "doc-r1", f={"route": "doc-r1"}),
             a.change("tasks", "🚚-ключ", "doc-r1",
                      f={"route": "doc-r1", "notes": "naïve \u0000 ✓", "proof": deep},
                      a={"labels": ["🚚", "x" * 32]})]
    start = a.mark()
    a.send_changes(legal)
    for ch in legal:
        a.wait_ok(ch["n"], start=start)
    assert fleet.value("tasks", "🚚-ключ", "notes") == "naïve \u0000 ✓"

    # One batch, each entry judged alone (§7.5): the good one is applied.
    key_201 = a.change("tasks", "é" * 100 + "x", "doc-r1", f={"route": "doc-r1"})
    unicode_field = a.change("tasks", "t-u", "doc-r1", f={"route": "doc-r1", "stätus": 1})
    unknown_field = a.change("tasks", "t-v", "doc-r1", f={"route": "doc-r1", "colour": 1})
    no_stamp = a.change("tasks", "t-w", "doc-r1", f={"route": "doc-r1"})
    del no_stamp["h"]
    good = a.change("tasks", "t-ok", "doc-r1", f={"route": "doc-r1", "status": "out"})
    start = a.mark()
    a.send_changes([key_201, unicode_field, unknown_field, no_stamp, good])
    assert a.wait_ok(good["n"], start=start)[1] == "doc-r1"
    codes = {ch["n"]: a.wait_rejection(ch["n"], start=start)
             for ch in (key_201, unicode_field, unknown_field, no_stamp)}
    assert {n: (r["code"], r["perm"]) for n, r in codes.items()} == {
        key_201["n"]: ("invalid", True), unicode_field["n"]: ("invalid", True),
        unknown_field["n"]: ("unknown_field", True), no_stamp["n"]: ("invalid", True)}

    # Message-level refusals (§7.5 `err`, rj empty): they name no change.
    refusals: list[tuple[dict[str, Any], str]] = [
        ({"type": "changes", "dev": a.dev, "sv": 1, "ch": []}, "invalid"),
        ({"type": "nope", "dev": a.dev}, "unknown_type"),
        ({"type": "hello", "dev": "doc-b1", "agent": "x", "sv": 1}, "wrong_device")]
    for body, code in refusals:
        start = a.mark()
        a.send(body)
        assert a.wait_err(start=start)["code"] == code, body
    # §7.1: a hello outside its bounds is refused whole: no welcome answers it (the
    # good hello after it gets the only one).
    bounds: list[dict[str, Any]] = [{"agent": "x" * 129}, {"caps": ["Sync"]},
                                    {"done": ["c"] * 1001}]
    for i, bad in enumerate(bounds):
        start = a.mark()
        good = {"type": "hello", "dev": a.dev, "agent": "doc-device/1", "sv": 1, "caps": []}
        a.send({**good, **bad})
        a.send(good)
        answers = [t for t in answered_until_checkpoint(a, start, f"c-h{i}") if t != "page"]
        assert answers == ["reject", "welcome"], (bad, answers)
        assert a.wait_err(start=start)["code"] == "invalid", bad
    a.close()


def test_duplicates_after_a_reconnect_are_acked_again_never_applied_twice(
        fleet: Fleet) -> None:
    """§9.2/§10.2: every unanswered change goes again after a reconnect; one the server
    applied is acked again with its original q and the whole record in fx, and applied
    once (a counter counts it once). The same id with other content is `id_reused`,
    also when its first entry was refused `invalid` (§10.2)."""
    a = device(fleet, "doc-a2", "doc-r2")
    put = a.change("tasks", "k2-1", "doc-r2", f={"route": "doc-r2"}, i={"attempts": 1},
                   a={"labels": ["fragile"]})
    bad = a.change("tasks", "k2-2", "doc-r2", f={"route": "doc-r2", "stätus": "x"})
    start = a.mark()
    a.send_changes([put, bad])
    first = a.wait_ok(put["n"], start=start)
    assert a.wait_rejection(bad["n"], start=start)["code"] == "invalid"

    a.close(clean=False)  # the link drops; the device never saw those answers
    a.connect()
    a.hello()
    start = a.mark()
    fixed = {**bad, "f": {"route": "doc-r2", "status": "x"}}  # its store went back
    a.send_changes([put, fixed])
    again = a.wait_for(lambda m: m["type"] == "ack", start=start, what="the ack")
    assert again["ok"] == [first]
    [whole] = again["fx"]
    assert (whole["q"], whole.get("part", False)) == (first[2], False)
    assert whole["f"]["attempts"] == 1 and whole["f"]["labels"] == ["fragile"]
    assert a.wait_rejection(fixed["n"], start=start)["code"] == "id_reused"
    assert fleet.value("tasks", "k2-1", "attempts") == 1
    assert fleet.record("tasks", "k2-2") is None
    assert fleet.scope_seq("doc-r2") == 1
    a.close()


def test_catchup_pages_live_deltas_gaps_and_a_stale_reconnect(fleet: Fleet) -> None:
    """§9.5 catch-up from 0 in pages of `lim` (each continuation asks with `lim` again);
    §7.6 a live delta of another device's change; §9.4 a sequence gap (a delta missed
    while counted offline) filled by a catch-up; §9.2 a reconnect with a stale
    checkpoint brings what was written meanwhile."""
    writer = device(fleet, "doc-w3", "doc-r3")
    chs = [writer.change("tasks", f"k3-{i}", "doc-r3", f={"route": "doc-r3"})
           for i in range(5)]
    start = writer.mark()
    writer.send_changes(chs)
    for ch in chs:
        writer.wait_ok(ch["n"], start=start)
    assert writer.cp == {"doc-r3": 5}  # its own acks advance its checkpoint (§9.4)

    reader = device(fleet, "doc-r3-dev", "doc-r3")
    pages = reader.sync("c-1", lim=2)
    assert [(p["from"], p["to"], p["more"], len(p["recs"])) for p in pages] == [
        (0, 2, True, 2), (2, 4, True, 2), (4, 5, False, 1)]
    assert reader.cp == {"doc-r3": 5} and len(reader.base) == 5

    start = reader.mark()
    live = writer.change("tasks", "k3-0", "doc-r3", f={"status": "out"})
    writer.send_changes([live])
    reader.wait_for(lambda m: m["type"] == "delta", start=start, what="a delta")
    reader.take_deltas(start)
    assert reader.cp == {"doc-r3": 6}
    assert reader.base[("tasks", "k3-0")]["f"]["status"] == "out"
    assert writer.of_type("delta") == []  # never a delta of one's own change

    # Counted offline (its status says so), it misses a delta; online again, the next
    # one shows the gap, which a catch-up fills.
    reader.status(False)
    fleet.wait(lambda: online(fleet, reader.dev) is False, 10, what="reader offline")
    missed = writer.change("tasks", "k3-1", "doc-r3", f={"status": "missed"})
    start = writer.mark()
    writer.send_changes([missed])
    writer.wait_ok(missed["n"], start=start)
    reader.status(True)
    fleet.wait(lambda: online(fleet, reader.dev), 10, what="reader online")
    start = reader.mark()
    writer.send_changes([writer.change("tasks", "k3-4", "doc-r3", f={"status": "next"})])
    reader.wait_for(lambda m: m["type"] == "delta", start=start, what="a delta")
    reader.take_deltas(start)
    assert reader.gaps() == {"doc-r3": 8} and reader.cp == {"doc-r3": 6}
    reader.sync("c-2")
    assert reader.cp == {"doc-r3": 8} and reader.gaps() == {}
    assert reader.base[("tasks", "k3-1")]["f"]["status"] == "missed"

    # Gone (clean stop: offline status), two writes meanwhile; back with its old state.
    reader.close()
    for i in (2, 3):
        ch = writer.change("tasks", f"k3-{i}", "doc-r3", f={"status": "later"})
        start = writer.mark()
        writer.send_changes([ch])
        writer.wait_ok(ch["n"], start=start)
    reader.connect()
    reader.hello()
    pages = reader.sync("c-3")
    assert [(p["from"], p["to"]) for p in pages] == [(8, 10)]
    assert sorted(r["k"] for r in pages[0]["recs"]) == ["k3-2", "k3-3"]
    writer.close()
    reader.close()


def online(fleet: Fleet, dev: str) -> bool | None:
    """The device's presence as the server holds it (what `server devices` lists; the
    server writes its view there about once a second)."""
    with fleet.store.read() as txn:
        return {row.id: row.online for row in txn.devices()}.get(dev)


def answered_until_checkpoint(d: DocDevice, start: int, req: str) -> list[str]:
    """Send a `catchup` and return the types of everything that came from `start` up to
    its `checkpoint`: the server answers one device's messages in order (§10.4) on one
    topic, so whatever answers an earlier message arrives before it."""
    d.catchup(req)
    end = d.wait_for(lambda m: m["type"] == "checkpoint" and m["req"] == req, start=start)
    return [m["type"] for m in d.messages[start:d.messages.index(end, start)]]


def test_operator_commands_disable_wipe_and_a_new_incarnation(fleet: Fleet) -> None:
    """§7.9 as the operator drives it (deploy/README.md): `device sync` reaches a device
    that agreed `sync`; a command not reported done comes again with the next hello, one
    reported is not; `device disable` holds changes and catch-ups with the transient
    `device_disabled`; `device wipe` sends the wipe first; after it the device's new
    store (new incarnation) numbers from 1 again and is applied as new changes once
    `device enable` lets it sync (with a `sync` command)."""
    d = device(fleet, "doc-d4", "doc-r4", caps=["sync"])
    old = d.change("tasks", "k4-1", "doc-r4", f={"route": "doc-r4", "status": "old"})
    start = d.mark()
    d.send_changes([old])
    d.wait_ok(old["n"], start=start)

    start = d.mark()
    cli(fleet, "sync", d.dev)
    sync = d.wait_for(lambda m: m["type"] == "command", start=start, what="sync command")
    assert sync["cmd"] == "sync"
    start = d.mark()
    d.hello(caps=["sync"])  # carried out, but the hello reporting it was "lost"
    assert d.wait_for(lambda m: m["type"] == "command", start=start)["id"] == sync["id"]
    start = d.mark()
    d.hello(caps=["sync"], done=[sync["id"], "no-such-command"])
    assert answered_until_checkpoint(d, start, "c-0") == ["welcome"]
    start = d.mark()
    d.hello(caps=["sync"], done=[sync["id"]])  # reported again: harmless
    assert answered_until_checkpoint(d, start, "c-00") == ["welcome"]

    cli(fleet, "disable", d.dev)
    held = d.change("tasks", "k4-2", "doc-r4", f={"route": "doc-r4"})
    start = d.mark()
    d.send_changes([held])
    refusal = d.wait_rejection(held["n"], start=start)
    assert (refusal["code"], refusal["perm"]) == ("device_disabled", False)
    start = d.mark()
    d.catchup("c-1")
    assert d.wait_err(start=start)["code"] == "device_disabled"

    start = d.mark()
    cli(fleet, "wipe", d.dev)
    wipe = d.wait_for(lambda m: m["type"] == "command", start=start, what="wipe command")
    assert wipe["cmd"] == "wipe"
    # Carried out: a new store, numbering from 1 again (§2), reported in hello.done.
    d.inc, d.next_n, d.cp, d.base = "doc-d4-second-store", 1, {"doc-r4": 0}, {}
    d.seen_q = {"doc-r4": set()}
    start = d.mark()
    d.hello(caps=["sync"], done=[wipe["id"]])
    d.wait_for(lambda m: m["type"] == "welcome", start=start)
    fresh = d.change("tasks", "k4-3", "doc-r4", f={"route": "doc-r4", "status": "new"})
    assert fresh["n"] == old["n"]
    start = d.mark()
    d.send_changes([fresh])
    assert d.wait_rejection(fresh["n"], start=start)["code"] == "device_disabled"

    start = d.mark()
    cli(fleet, "enable", d.dev)
    assert d.wait_for(lambda m: m["type"] == "command", start=start)["cmd"] == "sync"
    start = d.mark()
    d.send_changes([fresh])
    d.wait_ok(fresh["n"], start=start)  # a new change, not a repeat of the old store's 1
    assert fleet.value("tasks", "k4-3", "status") == "new"
    assert fleet.value("tasks", "k4-1", "status") == "old"  # the fleet's data stays
    pages = d.sync("c-2")
    assert sorted(r["k"] for p in pages for r in p["recs"]) == ["k4-1", "k4-3"]
    d.close()
