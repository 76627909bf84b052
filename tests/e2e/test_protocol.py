"""The server against a device written from docs/PROTOCOL.md alone (tests/e2e/protocol_device).

Over the real broker, that device does what a well-behaved agent never does: sends its
changes duplicated, shuffled and split differently every time, and sends garbage of
every kind the protocol names. The server must answer each with the protocol's outcome,
converge to the same records as an in-order delivery, keep what it refused for the
operator, and go on serving everyone else.
"""

from __future__ import annotations

import ast
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import protocol_device, protocol_zd
from tests.e2e.fleet import Fleet
from tests.e2e.protocol_device import ProtocolDevice
from waystation.convergence import server_records

pytestmark = pytest.mark.e2e

SCOPES = ("route-42", "depot-7")


def device(fleet: Fleet, dev: str) -> ProtocolDevice:
    """The protocol device `dev`, connected with the credentials it was enrolled with."""
    pd = ProtocolDevice(dev, fleet.passwords[dev], port=fleet.port,
                        scopes=fleet.scopes.get(dev, ()))
    assert pd.connect() == "Success", fleet.broker_log_tail()
    pd.hello()
    return pd


def _imports(module: Any) -> set[str]:
    """The modules `module`'s source imports (full dotted names)."""
    imported: set[str] = set()
    for node in ast.walk(ast.parse(Path(module.__file__).read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports"
            imported.add(node.module or "")
    return imported


def test_protocol_device_is_built_from_the_document_alone() -> None:
    """tests/e2e/protocol_device.py imports paho-mqtt, the standard library and its
    sibling tests/e2e/protocol_zd.py (the compact encodings, standard library alone),
    nothing ours."""
    allowed = {"paho", *sys.stdlib_module_names}
    imported = _imports(protocol_device)
    own = {name for name in imported if name.split(".")[0] not in allowed}
    assert own == {"tests.e2e.protocol_zd"}, own
    assert "paho" in {name.split(".")[0] for name in imported}
    roots = {name.split(".")[0] for name in _imports(protocol_zd)}
    assert roots <= set(sys.stdlib_module_names), roots - set(sys.stdlib_module_names)


def script(pd: ProtocolDevice) -> list[dict[str, Any]]:
    """One device's day: every strategy, a delete, a revival (changes n = 1, 2, ...)."""
    chs: list[dict[str, Any]] = []

    def add(c: str, k: str, s: str, **body: Any) -> dict[str, Any]:
        chs.append(pd.change(c, k, s, **body))
        return chs[-1]

    add("tasks", "t-1", "route-42", f={"route": "route-42", "customer": "Hendrikse Bakery",
                                       "status": "out", "address": "Keizersgracht 12"})
    for status in ("loaded", "en-route", "delivered"):
        add("tasks", "t-1", "route-42", f={"status": status})
    add("tasks", "t-1", "route-42", f={"address": "Keizersgracht 12, rear"})  # manual
    add("tasks", "t-1", "route-42", f={"address": "Keizersgracht 14"})
    for _ in range(5):
        add("tasks", "t-1", "route-42", i={"attempts": 1})
    fragile = add("tasks", "t-1", "route-42", a={"labels": ["fragile"]})
    add("tasks", "t-1", "route-42", a={"labels": ["heavy"]})
    add("tasks", "t-1", "route-42", r={"labels": {"fragile": [pd.tag(fragile["n"])]}})
    add("tasks", "t-1", "route-42", a={"labels": ["cold"]})
    add("tasks", "t-1", "route-42", f={"notes": "left at the back door",
                                       "proof": {"sig": "a1b2", "photos": [1, 2]}})
    add("tasks", "t-2", "route-42", f={"route": "route-42", "customer": "Cafe", "status": "out"})
    add("tasks", "t-2", "route-42", f={"status": "failed"})
    add("tasks", "t-2", "route-42", op="del")
    add("tasks", "t-2", "route-42", f={"status": "again"})  # revives it
    add("tasks", "t-3", "route-42", f={"route": "route-42", "status": "out"})
    add("tasks", "t-3", "route-42", op="del")
    add("inventory", "sku-1", "depot-7", f={"depot": "depot-7", "sku": "sku-1",
                                            "name": "Bread flour 25 kg"})
    # Only positive increments: with min = 0, a negative one would be refused or not
    # depending on the order it arrives in (that is the rule, not a sync problem).
    for amount in (10, 5, 7):
        add("inventory", "sku-1", "depot-7", i={"stock": amount})
    for bin_ in ("A-1", "A-2", "B-7"):
        add("inventory", "sku-1", "depot-7", f={"bin": bin_})
    return chs


EXPECTED = {
    ("tasks", "t-1"): {"route": "route-42", "customer": "Hendrikse Bakery",
                       "status": "delivered", "address": "Keizersgracht 14", "attempts": 5,
                       "labels": ["cold", "heavy"], "notes": "left at the back door",
                       "proof": {"sig": "a1b2", "photos": [1, 2]}},
    ("tasks", "t-2"): {"route": "route-42", "status": "again"},
    ("inventory", "sku-1"): {"depot": "depot-7", "sku": "sku-1", "name": "Bread flour 25 kg",
                             "stock": 22, "bin": "B-7"},
}


def split(rng: random.Random, chs: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The changes shuffled and cut into batches of 1 to 5."""
    order = chs[:]
    rng.shuffle(order)
    out = []
    while order:
        size = rng.randint(1, 5)
        out.append(order[:size])
        order = order[size:]
    return out


def test_duplicated_and_reordered_delivery(fleet: Fleet, tmp_path: Path) -> None:
    """Changes sent duplicated, shuffled, split and re-sent after their ack end as in order."""
    fleet.add_device("pd-1", SCOPES)
    pd = device(fleet, "pd-1")
    chs = script(pd)
    numbers = [ch["n"] for ch in chs]
    rng = random.Random(4242)
    sends = dict.fromkeys(numbers, 0)

    # Every change in two different batches, a third of the batches twice, all shuffled.
    batches = split(rng, chs) + split(rng, chs)
    batches += rng.sample(batches, len(batches) // 3)
    rng.shuffle(batches)
    for batch in batches:
        pd.send_changes(batch)
        for ch in batch:
            sends[ch["n"]] += 1
    pd.wait_acked(numbers)
    # Everything again after its ack, cut differently, half of it zlib-compressed.
    for i, batch in enumerate(split(rng, chs)):
        pd.send(pd.changes_message(batch), compress=i % 2 == 0)
        for ch in batch:
            sends[ch["n"]] += 1
    pd.wait(lambda: all(len(pd.acks.get(n, [])) >= sends[n] for n in numbers), 20,
            "an ack for every copy sent")

    assert pd.rejections == {} and pd.errors == [] and pd.undecodable == []
    for n in numbers:
        assert len(set(pd.acks[n])) == 1, f"change {n} acked with {sorted(set(pd.acks[n]))}"
    # One (scope, q) per change: the scopes' logs hold each change exactly once.
    applied_at = sorted(pd.acks[n][0] for n in numbers)
    assert applied_at == sorted((s, q) for s in SCOPES for q in range(1, fleet.scope_seq(s) + 1))

    got = server_records(fleet.store, SCOPES)
    for key, fields in EXPECTED.items():
        assert got[key].fields == fields, key
        assert not got[key].deleted
    assert got[("tasks", "t-3")].deleted

    # The same changes, once each and in order, to a second, fresh server.
    with Fleet(tmp_path / "reference", fleet.kind) as ref:
        ref.start()
        ref.add_device("pd-1", SCOPES)
        ordered = device(ref, "pd-1")
        try:
            ordered.send_changes(chs)
            ordered.wait_acked(numbers)
            assert ordered.rejections == {}
            assert server_records(ref.store, SCOPES) == got
            for c, k in got:
                mine, theirs = fleet.record(c, k), ref.record(c, k)
                assert mine is not None and theirs is not None
                assert {n: v for n, v in mine.items() if n != "q"} == \
                    {n: v for n, v in theirs.items() if n != "q"}, (c, k)
        finally:
            ordered.close()

    # The device's own base, rebuilt by a paged catch-up from zero, equals the server.
    pd.cp = dict.fromkeys(SCOPES, 0)
    pd.records.clear()
    pd.sync_from_server(lim=2)
    assert any(p["more"] for p in pd.pages) and len(pd.pages) == 3  # route-42 in two pages
    assert pd.cp == {s: fleet.scope_seq(s) for s in SCOPES}
    for key, view in got.items():
        rec = pd.records[key]
        assert rec["x"] == view.deleted, key
        if not view.deleted:
            assert rec["f"] == view.fields, key
    pd.close()


# ------------------------------------------------------------------------ bad input


def far_future_stamp(days: int = 1) -> str:
    ms = time.time_ns() // 1_000_000 + days * 86_400_000
    return f"{ms:012x}0000"


def test_bad_input_over_the_real_broker(fleet: Fleet) -> None:
    """Every kind of bad input gets its reject code and a dead letter; nobody else is harmed."""
    fleet.add_device("pd-bad", ["depot-7"])
    fleet.add_device("van-1", ["depot-7"])
    fleet.add_login("pd-ghost", "ghost-password-1")  # broker login, not registered
    pd = device(fleet, "pd-bad")
    ag = fleet.agent("van-1")
    ag.put("inventory", "sku-9", {"depot": "depot-7", "sku": "sku-9"})
    fleet.start_agent("van-1")
    server_pid = fleet.server.pid

    def van_writes(count: int) -> None:
        for _ in range(count):
            ag.increment("inventory", "sku-9", "stock", 1)

    van_writes(25)
    codes: list[str] = []

    def message_error(payload: bytes, code: str) -> None:
        before = len(pd.errors)
        pd.send_raw(payload)
        err = pd.wait_error(code, after=before)
        assert err["reason"], err
        codes.append(code)

    message_error(b"{this is not json", "malformed")
    message_error(json.dumps({"type": "bogus", "v": 1, "dev": "pd-bad"}).encode(),
                  "unknown_type")
    message_error(json.dumps({"type": "hello", "v": 2, "dev": "pd-bad", "agent": "x",
                              "sv": 1}).encode(), "unsupported_version")
    # Just over the protocol's 256 KiB, under Mosquitto's max_packet_size: the server says so.
    big = pd.changes_message([pd.change("inventory", "sku-9", "depot-7", i={"stock": 1})],
                             pad="x" * (262_144 + 1_000))
    message_error(json.dumps(big).encode(), "too_large")
    van_writes(25)
    # Over the broker's packet limit (Mosquitto's max_packet_size, the embedded broker's
    # max_packet_bytes): the broker disconnects the sender; nothing reaches the server.
    huge = json.dumps(pd.changes_message([], pad="y" * 300_000)).encode()
    drops = len(pd.disconnects)
    pd.client.publish(pd.up, huge, qos=1)
    pd.wait(lambda: len(pd.disconnects) > drops, 15, "the broker dropping the sender")
    # (paho would send it again on every reconnect: the device starts afresh.)
    assert pd.restart() == "Success"
    pd.hello()
    message_error(json.dumps({"type": "hello", "v": 1, "dev": "van-1", "agent": "forged",
                              "sv": 1}).encode(), "wrong_device")

    ghost = ProtocolDevice("pd-ghost", "ghost-password-1", port=fleet.port, scopes=["depot-7"])
    assert ghost.connect() == "Success"
    ghost.send_changes([ghost.change("inventory", "sku-9", "depot-7", i={"stock": 100})])
    assert ghost.wait_error("unknown_device")["reason"]
    codes.append("unknown_device")
    ghost.close()
    van_writes(25)

    # Change-level refusals, one batch each (a dead letter is kept per batch).
    create = pd.change("inventory", "sku-bad", "depot-7", f={"depot": "depot-7"},
                       i={"stock": 5})
    pd.send_changes([create])
    pd.wait_acked([create["n"]])
    bad_changes = {
        "scope_denied": pd.change("tasks", "t-9", "route-42", f={"route": "route-42"}),
        "unknown_collection": pd.change("ghosts", "g-1", "depot-7", f={"boo": 1}),
        "unknown_field": pd.change("inventory", "sku-bad", "depot-7", f={"colour": "red"}),
        "type_mismatch": pd.change("inventory", "sku-bad", "depot-7", f={"name": 42}),
        "rule_rejected": pd.change("inventory", "sku-bad", "depot-7", i={"stock": -10}),
    }
    for code, ch in bad_changes.items():
        pd.send_changes([ch])
        rj = pd.wait_rejected(ch["n"])
        assert (rj["code"], rj["perm"]) == (code, True), rj
        codes.append(code)
    skewed = pd.change("inventory", "sku-bad", "depot-7", h=far_future_stamp(),
                       f={"bin": "Z-9"})
    pd.send_changes([skewed])
    pd.wait_acked([skewed["n"]])
    assert skewed["n"] in pd.restamped
    fx = next(r for r in pd.messages if r.get("type") == "ack" and r.get("rs"))["fx"]
    restamp = fx[0]["h"]["bin"].split(":")[0]
    assert restamp < skewed["h"], "the stored stamp is the server's, not the future one"
    codes.append("clock_skew")
    van_writes(25)

    # The other device was served all along; the server never stopped.
    fleet.wait_drained("van-1", timeout=60)
    assert fleet.value("inventory", "sku-9", "stock") == 100
    assert fleet.value("inventory", "sku-bad", "stock") == 5
    assert fleet.value("inventory", "sku-bad", "bin") == "Z-9"
    fleet.wait_converged("van-1", timeout=30)
    assert fleet.server.running and fleet.server.pid == server_pid
    assert fleet.server.starts == 1

    letters = fleet.server_dead_letters()
    kept = [(d["device"], d["code"]) for d in letters]
    for code in codes:
        dev = "pd-ghost" if code == "unknown_device" else "pd-bad"
        assert (dev, code) in kept, f"no dead letter {dev}/{code} in {kept}"
    assert not any(d["device"] == "van-1" for d in letters)
    by_code = {d["code"]: d for d in letters if d["device"] == "pd-bad"}
    assert by_code["malformed"]["raw"] == "{this is not json"
    assert "bogus" in by_code["unknown_type"]["raw"]
    sizes = [d["size"] for d in letters if d["code"] == "too_large"]
    assert min(sizes) > 262_144
    # the one over the broker's packet limit never got past the broker
    assert len(sizes) == 1 and max(sizes) < 266_240
    assert '"forged"' in by_code["wrong_device"]["raw"]
    pd.close()
