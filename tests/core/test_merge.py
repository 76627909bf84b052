"""Example-based tests of the merge core (docs/PROTOCOL.md §5, §6, §8)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from schemas.collection import CollectionSpec, parse_catalog
from schemas.wire import Change, Rec
from waystation import merge
from waystation.errors import ConfigError
from waystation.hlc import SERVER_NODE, Stamp
from waystation.merge import (
    ConflictEntry,
    Counter,
    Outcome,
    RecordState,
    Register,
    SetField,
    Version,
    apply_change,
    check_change,
    delta_rec,
    from_json,
    fx_rec,
    latest_stamp,
    resolve,
    to_json,
    to_rec,
)
from waystation.rules import RuleContext, RuleDecision, load_rules, strip_strings

T0 = 1_764_000_000_000

CATALOG = parse_catalog({
    "version": 1,
    "collections": {
        "tasks": {
            "scope_field": "route",
            "fields": {
                "route": {"type": "string"},
                "status": {"type": "string"},
                "eta": {"type": "int"},
                "price": {"type": "float", "min": 0},
                "proof": {"type": "json"},
                "address": {"type": "string", "merge": "manual"},
                "attempts": {"type": "int", "merge": "counter", "min": 0},
                "weight": {"type": "float", "merge": "counter"},
                "labels": {"type": "set", "max_length": 8},
            },
        },
        "inventory": {
            "scope_field": "depot",
            "fields": {
                "depot": {"type": "string"},
                "stock": {"type": "int", "merge": "counter", "min": 0, "max": 100},
            },
        },
        "notes": {
            "scope": "fleet",
            "fields": {"text": {"type": "string"}, "tags": {"type": "set"}},
        },
    },
})
TASKS: CollectionSpec = CATALOG.collections["tasks"]
INVENTORY: CollectionSpec = CATALOG.collections["inventory"]
NOTES: CollectionSpec = CATALOG.collections["notes"]


def tp(ms: int, counter: int = 0) -> str:
    return Stamp(T0 + ms, counter, "x").time_part()


def change(n: int, ms: int, *, c: str = "tasks", k: str = "t-1", s: str = "r-1", b: int = 0,
           op: str = "put", **body: Any) -> Change:
    return Change.model_validate({"n": n, "h": tp(ms), "c": c, "k": k, "s": s, "b": b,
                                  "op": op, **body})


def create(dev: str = "van-1", **extra: Any) -> RecordState:
    """A tasks record t-1 in scope r-1 created by `dev` at q 1 (stamp T0)."""
    fields = {"route": "r-1", "status": "pending", **extra}
    out = apply_change(None, change(1, 0, f=fields), dev, 1, TASKS)
    assert out.applied, out.rejection
    assert out.record is not None
    return out.record


def ok(out: Outcome) -> RecordState:
    assert out.applied, out.rejection
    assert out.record is not None
    return out.record


def valid_rec(data: dict[str, Any]) -> dict[str, Any]:
    """The state validates as a wire Rec and survives orjson."""
    Rec.model_validate(orjson.loads(orjson.dumps(data)))
    return data


# --- lww --------------------------------------------------------------------------------


def test_lww_higher_stamp_wins_in_either_arrival_order() -> None:
    """Two concurrent writes: the later stamp wins whichever arrives first."""
    rec = create()
    a = change(1, 100, f={"status": "delivered"})
    b = change(1, 200, f={"status": "failed"})
    one = ok(apply_change(ok(apply_change(rec, a, "van-2", 2, TASKS)), b, "van-3", 3, TASKS))
    two = ok(apply_change(ok(apply_change(rec, b, "van-3", 2, TASKS)), a, "van-2", 3, TASKS))
    assert one.value("status") == two.value("status") == "failed"


def test_lww_overwritten_concurrent_value_is_logged() -> None:
    """A winning write that did not see the value logs the displaced value as loser."""
    rec = ok(apply_change(create(), change(1, 100, f={"status": "a"}), "van-2", 2, TASKS))
    out = apply_change(rec, change(1, 200, b=1, f={"status": "b"}), "van-3", 3, TASKS)
    assert [(e.kind, e.field, e.winner and e.winner.v, e.loser.v, e.loser.by, e.q)
            for e in out.conflicts] == [("lww", "status", "b", "a", "van-2", 3)]
    assert out.changed == {"status"}
    assert out.fixups == set()


def test_lww_losing_late_write_is_logged_and_fixed_up() -> None:
    """A concurrent write with an older stamp loses, is logged, and is in the ack's fx."""
    rec = ok(apply_change(create(), change(1, 200, f={"status": "b"}), "van-3", 2, TASKS))
    out = apply_change(rec, change(1, 100, f={"status": "a"}), "van-2", 3, TASKS)
    new = ok(out)
    assert new.value("status") == "b"
    assert new.q == 3
    assert [(e.kind, e.winner and e.winner.v, e.loser.v) for e in out.conflicts] == [
        ("lww", "b", "a")]
    assert out.fixups == {"status"}
    assert out.changed == set()
    assert fx_rec(out) == {"c": "tasks", "k": "t-1", "s": "r-1", "q": 3, "part": True,
                           "f": {"status": "b"},
                           "h": {"status": Stamp(T0 + 200, 0, "van-3").encode()}}


def test_lww_write_that_saw_the_value_replaces_it_without_conflict() -> None:
    """b >= the value's q means the writer saw it: no conflict entry."""
    rec = ok(apply_change(create(), change(1, 100, f={"status": "a"}), "van-2", 2, TASKS))
    out = apply_change(rec, change(1, 200, b=2, f={"status": "b"}), "van-3", 3, TASKS)
    assert ok(out).value("status") == "b"
    assert out.conflicts == []


def test_lww_write_that_saw_the_value_but_lost_by_stamp_is_logged() -> None:
    """Clock skew: a write that saw the value but carries an older stamp is logged."""
    rec = ok(apply_change(create(), change(1, 500, f={"status": "a"}), "van-2", 2, TASKS))
    out = apply_change(rec, change(1, 200, b=2, f={"status": "b"}), "van-3", 3, TASKS)
    assert ok(out).value("status") == "a"
    assert [(e.winner and e.winner.v, e.loser.v) for e in out.conflicts] == [("a", "b")]


def test_lww_own_older_write_arriving_late_is_discarded_silently() -> None:
    """A device's own older write loses to its newer one without a conflict entry."""
    rec = ok(apply_change(create(), change(3, 300, f={"status": "new"}), "van-2", 2, TASKS))
    out = apply_change(rec, change(2, 200, f={"status": "old"}), "van-2", 3, TASKS)
    assert ok(out).value("status") == "new"
    assert out.conflicts == []
    assert out.fixups == {"status"}
    assert ok(out).q == 3


def test_lww_null_clears_but_the_field_still_exists() -> None:
    """A null value is stored and listed as null in the record state."""
    rec = ok(apply_change(create(), change(1, 100, b=1, f={"status": None}), "van-1", 2, TASKS))
    state = valid_rec(to_rec(rec))
    assert state["f"]["status"] is None
    assert "status" in state["h"]


def test_every_applied_change_bumps_the_version() -> None:
    """Even a change that alters no value moves the record's version to its q."""
    rec = create()
    out = apply_change(rec, change(7, -50, f={"status": "older"}), "van-1", 9, TASKS)
    assert ok(out).q == 9
    assert out.changed == set()


def test_restamped_change_uses_the_given_stamp_but_keeps_the_writer() -> None:
    """`stamp=` overrides the change's stamp; the version still names the device."""
    server = Stamp(T0 + 5, 0, SERVER_NODE)
    out = apply_change(create(), change(2, 9_000_000, b=1, f={"status": "x"}), "van-1", 2,
                       TASKS, stamp=server)
    reg = ok(out).fields["status"]
    assert isinstance(reg, Register)
    assert reg.value == Version("x", server, "van-1", 2)
    assert out.stamp == server
    assert from_json(to_json(ok(out))) == ok(out)


# --- counter ----------------------------------------------------------------------------


def test_counter_increments_add_up_and_are_always_fixed_up() -> None:
    """Increments from several devices sum; the writer always gets the new total."""
    rec = create()
    rec = ok(apply_change(rec, change(1, 10, i={"attempts": 2}), "van-2", 2, TASKS))
    out = apply_change(rec, change(1, 5, i={"attempts": 3}), "van-3", 3, TASKS)
    assert ok(out).value("attempts") == 5
    assert out.fixups == {"attempts"}
    assert out.conflicts == []
    assert fx_rec(out) == {"c": "tasks", "k": "t-1", "s": "r-1", "q": 3, "part": True,
                           "f": {"attempts": 5}}


def test_counter_below_minimum_is_rule_rejected_with_a_clear_reason() -> None:
    """A decrement that would take the total below min is refused, naming the numbers."""
    rec = ok(apply_change(None, change(1, 0, c="inventory", k="sku-1", s="d-1",
                                       f={"depot": "d-1"}, i={"stock": 3}), "van-1", 1,
                          INVENTORY))
    out = apply_change(rec, change(2, 10, c="inventory", k="sku-1", s="d-1",
                                   i={"stock": -5}), "van-1", 2, INVENTORY)
    assert not out.applied
    assert out.rejection == ("rule_rejected",
                             "inventory/sku-1: stock would go below 0 (is 3, change -5)")
    assert out.record is rec


def test_counter_above_maximum_is_rule_rejected() -> None:
    """An increment past max is refused; one that lands exactly on max is fine."""
    rec = ok(apply_change(None, change(1, 0, c="inventory", k="sku-1", s="d-1",
                                       f={"depot": "d-1"}, i={"stock": 98}), "van-1", 1,
                          INVENTORY))
    out = apply_change(rec, change(2, 1, c="inventory", k="sku-1", s="d-1", i={"stock": 5}),
                       "van-1", 2, INVENTORY)
    assert out.rejection == ("rule_rejected",
                             "inventory/sku-1: stock would go above 100 (is 98, change 5)")
    out = apply_change(rec, change(2, 1, c="inventory", k="sku-1", s="d-1", i={"stock": 2}),
                       "van-1", 2, INVENTORY)
    assert ok(out).value("stock") == 100


def test_float_counter_takes_float_increments_and_int_counter_refuses_them() -> None:
    """A float counter sums floats; an int counter answers type_mismatch to 0.5."""
    rec = ok(apply_change(create(), change(1, 1, i={"weight": 1.5}), "van-1", 2, TASKS))
    assert ok(apply_change(rec, change(2, 2, i={"weight": 2}), "van-1", 3, TASKS)
              ).value("weight") == 3.5
    out = apply_change(rec, change(2, 2, i={"attempts": 0.5}), "van-1", 3, TASKS)
    assert out.rejection is not None and out.rejection[0] == "type_mismatch"


# --- set --------------------------------------------------------------------------------


def test_set_add_and_remove_by_observed_tags() -> None:
    """Adds are tagged with the change id; removing every observed tag removes the member."""
    rec = ok(apply_change(create(), change(2, 10, a={"labels": ["fragile", "cold"]}),
                          "van-1", 2, TASKS))
    state = valid_rec(to_rec(rec))
    assert state["f"]["labels"] == ["cold", "fragile"]
    assert state["t"]["labels"] == {"cold": ["van-1:2"], "fragile": ["van-1:2"]}
    out = apply_change(rec, change(3, 20, b=2, r={"labels": {"fragile": ["van-1:2"]}}),
                       "van-1", 3, TASKS)
    assert ok(out).value("labels") == ["cold"]
    assert out.fixups == {"labels"}


def test_set_add_wins_over_a_concurrent_remove() -> None:
    """A member re-added concurrently survives a remove that did not name the new tag."""
    rec = ok(apply_change(create(), change(2, 10, a={"labels": ["x"]}), "van-1", 2, TASKS))
    rec = ok(apply_change(rec, change(5, 30, a={"labels": ["x"]}), "van-2", 3, TASKS))
    out = apply_change(rec, change(3, 40, b=2, r={"labels": {"x": ["van-1:2"]}}),
                       "van-1", 4, TASKS)
    new = ok(out)
    assert new.value("labels") == ["x"]
    assert to_rec(new)["t"]["labels"] == {"x": ["van-2:5"]}


def test_set_remove_arriving_before_its_add_still_wins() -> None:
    """A remove naming a tag not yet seen blocks that add when it arrives later."""
    rec = create()
    rec = ok(apply_change(rec, change(9, 50, r={"labels": {"x": ["van-2:4"]}}), "van-3", 2,
                          TASKS))
    rec = ok(apply_change(rec, change(4, 10, a={"labels": ["x", "y"]}), "van-2", 3, TASKS))
    assert rec.value("labels") == ["y"]


def test_set_add_and_remove_in_one_change_for_different_members() -> None:
    """One change may add some members and remove others of the same set."""
    rec = ok(apply_change(create(), change(2, 10, a={"labels": ["a"]}), "van-1", 2, TASKS))
    out = apply_change(rec, change(3, 20, b=2, a={"labels": ["b"]},
                                   r={"labels": {"a": ["van-1:2"]}}), "van-1", 3, TASKS)
    assert ok(out).value("labels") == ["b"]


def test_set_remove_only_on_a_missing_record_is_accepted() -> None:
    """A put that only removes set members may reach a record that does not exist yet."""
    out = apply_change(None, change(1, 0, r={"labels": {"x": ["van-2:1"]}}), "van-1", 1, TASKS)
    rec = ok(out)
    assert rec.s == "r-1"
    assert valid_rec(to_rec(rec)) == {"c": "tasks", "k": "t-1", "s": "r-1", "q": 1}
    rec = ok(apply_change(rec, change(1, -5, f={"route": "r-1"}, a={"labels": ["x"]}),
                          "van-2", 2, TASKS))
    assert rec.value("labels") is None
    assert rec.value("route") == "r-1"


# --- manual -----------------------------------------------------------------------------


def test_manual_concurrent_write_opens_a_conflict_and_keeps_the_value() -> None:
    """The first value stands; a concurrent write becomes a candidate and is logged open."""
    rec = create(address="Dock 1")
    out = apply_change(rec, change(1, 100, f={"address": "Dock 9"}), "van-7", 2, TASKS)
    new = ok(out)
    assert new.value("address") == "Dock 1"
    reg = new.fields["address"]
    assert isinstance(reg, Register)
    assert [c.v for c in reg.cf] == ["Dock 9"] and reg.cfq == 2
    assert [(e.kind, e.open, e.winner and e.winner.v, e.loser.v) for e in out.conflicts] == [
        ("manual", True, "Dock 1", "Dock 9")]
    assert out.fixups == {"address"}
    state = valid_rec(to_rec(new))
    assert state["cf"] == {"address": [{"v": "Dock 9", "by": "van-7",
                                        "h": Stamp(T0 + 100, 0, "van-7").encode()}]}


def test_manual_write_after_seeing_the_conflict_resolves_it() -> None:
    """A write whose base includes the open conflict replaces the value and closes it."""
    rec = ok(apply_change(create(address="Dock 1"),
                          change(1, 100, f={"address": "Dock 9"}), "van-7", 2, TASKS))
    out = apply_change(rec, change(2, 200, b=2, f={"address": "Dock 4"}), "van-1", 3, TASKS)
    new = ok(out)
    assert new.value("address") == "Dock 4"
    assert out.resolved == ["address"]
    assert "cf" not in to_rec(new)
    assert out.conflicts == [] and out.fixups == set()


def test_manual_write_without_seeing_the_conflict_keeps_it_open() -> None:
    """The value's own device writing again without seeing candidates keeps them open."""
    rec = ok(apply_change(create(address="Dock 1"),
                          change(1, 100, f={"address": "Dock 9"}), "van-7", 2, TASKS))
    out = apply_change(rec, change(2, 200, b=1, f={"address": "Dock 2"}), "van-1", 3, TASKS)
    new = ok(out)
    assert new.value("address") == "Dock 2"
    reg = new.fields["address"]
    assert isinstance(reg, Register) and [c.v for c in reg.cf] == ["Dock 9"]
    assert out.resolved == [] and out.fixups == {"address"}


def test_manual_keeps_one_candidate_per_device_newest_stamp() -> None:
    """A device's newer concurrent value replaces its older candidate, not the reverse."""
    rec = create(address="Dock 1")
    rec = ok(apply_change(rec, change(2, 200, f={"address": "B2"}), "van-7", 2, TASKS))
    out = apply_change(rec, change(1, 100, f={"address": "B1"}), "van-7", 3, TASKS)
    reg = ok(out).fields["address"]
    assert isinstance(reg, Register) and [c.v for c in reg.cf] == ["B2"]
    assert out.conflicts == []
    rec = ok(apply_change(rec, change(3, 300, f={"address": "B3"}), "van-7", 4, TASKS))
    reg = rec.fields["address"]
    assert isinstance(reg, Register) and [c.v for c in reg.cf] == ["B3"]


def test_operator_resolve_closes_the_conflict() -> None:
    """resolve() writes the operator's value as ~server and closes the conflict."""
    rec = ok(apply_change(create(address="Dock 1"),
                          change(1, 100, f={"address": "Dock 9"}), "van-7", 2, TASKS))
    newest = latest_stamp(rec)
    assert newest == Stamp(T0 + 100, 0, "van-7")
    stamp = Stamp(T0 + 1000, 0, SERVER_NODE)
    out = resolve(rec, "address", "Dock 5", 3, stamp, spec=TASKS)
    new = ok(out)
    assert new.value("address") == "Dock 5"
    assert new.fields["address"] == Register(Version("Dock 5", stamp, SERVER_NODE, 0), 3)
    assert out.resolved == ["address"] and out.changed == {"address"}
    assert new.q == 3 and new.wh == stamp
    valid_rec(to_rec(new))


def test_operator_resolve_refuses_bad_requests() -> None:
    """No open conflict, a non-manual field, a bad value or an old stamp are refused."""
    rec = create(address="Dock 1")
    later = Stamp(T0 + 1000, 0, SERVER_NODE)
    assert resolve(rec, "address", "x", 2, later).rejection == (
        "invalid", "tasks/t-1: field 'address' has no open conflict to resolve")
    assert resolve(rec, "status", "x", 2, later, spec=TASKS).rejection is not None
    assert resolve(rec, "nope", "x", 2, later, spec=TASKS).rejection is not None
    rec = ok(apply_change(rec, change(1, 100, f={"address": "Dock 9"}), "van-7", 2, TASKS))
    bad = resolve(rec, "address", 5, 3, later, spec=TASKS)
    assert bad.rejection is not None and bad.rejection[0] == "type_mismatch"
    assert bad.record is rec
    with pytest.raises(ValueError, match="not later"):
        resolve(rec, "address", "x", 3, Stamp(T0 + 50, 0, SERVER_NODE))


# --- delete -----------------------------------------------------------------------------


def test_delete_tombstones_the_record() -> None:
    """A delete hides every field; the state says x with the delete stamp."""
    rec = create()
    out = apply_change(rec, change(2, 100, b=1, op="del"), "van-1", 2, TASKS)
    new = ok(out)
    assert new.deleted and new.values() == {}
    assert valid_rec(to_rec(new)) == {"c": "tasks", "k": "t-1", "s": "r-1", "q": 2, "x": True,
                                      "xh": Stamp(T0 + 100, 0, "van-1").encode()}
    assert out.conflicts == [] and not out.fix_deleted


def test_revival_shows_only_writes_after_the_delete_but_keeps_counters() -> None:
    """A later write revives the record; older values stay gone, counter totals survive."""
    rec = ok(apply_change(create(), change(2, 10, b=1, i={"attempts": 4}), "van-1", 2, TASKS))
    rec = ok(apply_change(rec, change(3, 100, b=2, op="del"), "van-1", 3, TASKS))
    out = apply_change(rec, change(1, 200, b=3, f={"eta": 5}), "van-2", 4, TASKS)
    new = ok(out)
    assert not new.deleted
    assert new.values() == {"route": "r-1", "eta": 5, "attempts": 4}
    assert out.whole
    assert delta_rec(out) == to_rec(new)


def test_write_stamped_before_a_delete_is_discarded_and_logged() -> None:
    """Another device's late write older than the delete does not revive it; it is logged."""
    rec = ok(apply_change(create(), change(2, 100, b=1, op="del"), "van-1", 2, TASKS))
    out = apply_change(rec, change(1, 50, f={"status": "late"}), "van-2", 3, TASKS)
    new = ok(out)
    assert new.deleted
    assert [(e.kind, e.field, e.loser.v, e.winner and e.winner.h) for e in out.conflicts] == [
        ("delete", "status", "late", Stamp(T0 + 100, 0, "van-1"))]
    assert out.fix_deleted
    assert fx_rec(out) == {"c": "tasks", "k": "t-1", "s": "r-1", "q": 3, "part": True,
                           "x": True, "xh": Stamp(T0 + 100, 0, "van-1").encode()}


def test_own_older_write_never_revives_a_record_the_device_deleted() -> None:
    """The deleting device's own earlier write arriving late is dropped without a log."""
    rec = ok(apply_change(create(), change(3, 100, b=1, op="del"), "van-1", 2, TASKS))
    out = apply_change(rec, change(2, 50, b=1, f={"status": "x"}, a={"labels": ["y"]}),
                       "van-1", 3, TASKS)
    assert ok(out).deleted
    assert out.conflicts == []


def test_delete_of_an_unseen_value_is_logged() -> None:
    """A delete that did not see a value it hides logs that value (kind delete)."""
    rec = ok(apply_change(create(), change(1, 50, f={"status": "new"}), "van-2", 2, TASKS))
    out = apply_change(rec, change(2, 100, b=1, op="del"), "van-1", 3, TASKS)
    assert [(e.kind, e.loser.v, e.loser.by) for e in out.conflicts] == [
        ("delete", "new", "van-2")]


def test_late_delete_hides_only_older_values() -> None:
    """A delete stamped before a later write leaves the record alive without older fields."""
    rec = ok(apply_change(create(), change(1, 300, b=1, f={"eta": 7}), "van-2", 2, TASKS))
    out = apply_change(rec, change(2, 100, b=1, op="del"), "van-1", 3, TASKS)
    new = ok(out)
    assert not new.deleted
    assert new.values() == {"route": "r-1", "eta": 7}
    assert out.fix_deleted and out.whole
    assert fx_rec(out) == to_rec(new)


def test_delete_of_a_missing_record_leaves_a_tombstone_that_wins_over_older_writes() -> None:
    """A delete arriving before the record's creation still hides the earlier create."""
    rec = ok(apply_change(None, change(5, 100, op="del"), "van-1", 1, TASKS))
    rec = ok(apply_change(rec, change(4, 50, f={"route": "r-1", "status": "a"}), "van-1", 2,
                          TASKS))
    assert rec.deleted


def test_delete_hides_set_members_and_manual_candidates() -> None:
    """Tags and conflict candidates older than the delete vanish with it."""
    rec = create(address="A")
    rec = ok(apply_change(rec, change(2, 10, a={"labels": ["x"]}), "van-1", 2, TASKS))
    rec = ok(apply_change(rec, change(1, 20, f={"address": "B"}), "van-7", 3, TASKS))
    rec = ok(apply_change(rec, change(3, 100, b=3, op="del"), "van-1", 4, TASKS))
    rec = ok(apply_change(rec, change(4, 200, b=4, f={"status": "again"}), "van-1", 5, TASKS))
    assert rec.values() == {"route": "r-1", "status": "again"}


# --- validation -------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "code", "needle"), [
    ({"f": {"colour": "red"}}, "unknown_field", "no field 'colour'"),
    ({"i": {"colour": 1}}, "unknown_field", "no field 'colour'"),
    ({"a": {"colour": ["x"]}}, "unknown_field", "no field 'colour'"),
    ({"r": {"colour": {"x": ["a:1"]}}}, "unknown_field", "no field 'colour'"),
    ({"f": {"eta": "soon"}}, "type_mismatch", "expected an integer"),
    ({"f": {"status": 5}}, "type_mismatch", "expected a string"),
    ({"a": {"labels": ["much-too-long"]}}, "type_mismatch", "longer than 8"),
    ({"f": {"attempts": 5}}, "wrong_strategy", "send an increment in 'i'"),
    ({"f": {"labels": ["x"]}}, "wrong_strategy", "'a'"),
    ({"i": {"status": 1}}, "wrong_strategy", "send its new value in 'f'"),
    ({"a": {"status": ["x"]}}, "wrong_strategy", "lww field"),
    ({"r": {"eta": {"x": ["a:1"]}}}, "wrong_strategy", "lww field"),
    ({"f": {"price": -1.0}}, "rule_rejected", "below the minimum 0"),
])
def test_invalid_changes_get_the_protocol_codes(body: dict[str, Any], code: str,
                                                needle: str) -> None:
    """Each kind of invalid change is rejected with its §8 code and a helpful reason."""
    rec = create()
    out = apply_change(rec, change(2, 10, **body), "van-1", 2, TASKS)
    assert not out.applied
    assert out.rejection is not None
    assert out.rejection[0] == code
    assert needle in out.rejection[1]
    assert out.rejection[1].startswith("tasks/t-1: ")
    assert out.record is rec
    assert check_change(rec, change(2, 10, **body), TASKS) == out.rejection


def test_type_errors_are_reported_before_range_errors() -> None:
    """With one value out of range and another of the wrong type, type_mismatch wins."""
    out = apply_change(create(), change(2, 1, f={"price": -5.0, "eta": "x"}), "van-1", 2, TASKS)
    assert out.rejection is not None and out.rejection[0] == "type_mismatch"


@pytest.mark.parametrize(("record", "body", "s", "needle"), [
    (False, {"f": {"route": "r-2"}}, "r-1", "sets 'route' to 'r-2'"),
    (False, {"f": {"route": None}}, "r-1", "sets 'route' to null"),  # JSON, not Python
    (True, {"f": {"status": "x"}}, "r-2", "another scope than 'r-2'"),
    (True, {"f": {"route": "r-2"}}, "r-1", "cannot change"),
    (True, {"f": {"route": None}}, "r-1", "cannot change"),
    (True, {"f": {"route": None}}, "r-1", "the change sets null"),  # JSON, not Python
    (True, {"i": {"attempts": 1}}, "r-2", "another scope than 'r-2'"),
])
def test_scope_rules(record: bool, body: dict[str, Any], s: str, needle: str) -> None:
    """The scope field may only ever be set to the change's scope; it can never change."""
    rec = create() if record else None
    out = apply_change(rec, change(2, 10, s=s, **body), "van-1", 2, TASKS)
    assert out.rejection is not None
    assert out.rejection[0] == "scope_mismatch"
    assert needle in out.rejection[1]
    if record and s != "r-1":  # the record's own scope is never named (it may be hidden)
        assert "r-1" not in out.rejection[1]
    assert out.record is rec


@pytest.mark.parametrize("body", [{"f": {"status": "x"}}, {"i": {"attempts": 2}},
                                  {"a": {"labels": ["x"]}}])
def test_change_arriving_before_the_creating_put_is_applied(body: dict[str, Any]) -> None:
    """A later change that overtakes the put creating its record (priorities, a lost and
    resent batch) is applied, and the creating put then completes the record exactly as
    in-order delivery would have."""
    creating = change(1, 10, f={"route": "r-1", "eta": 5})
    first = ok(apply_change(None, change(2, 20, **body), "van-1", 1, TASKS))
    assert first.s == "r-1"
    late = ok(apply_change(first, creating, "van-1", 2, TASKS))
    created = ok(apply_change(None, creating, "van-1", 1, TASKS))
    in_order = ok(apply_change(created, change(2, 20, b=1, **body), "van-1", 2, TASKS))
    assert late.values() == in_order.values()
    assert late.values()["route"] == "r-1"


def test_scope_field_may_be_written_again_with_the_same_value() -> None:
    """Setting the scope field to the record's scope on update is accepted."""
    out = apply_change(create(), change(2, 10, b=1, f={"route": "r-1"}), "van-1", 2, TASKS)
    assert out.applied


def test_fixed_scope_collection_checks_the_scope() -> None:
    """A collection with one fixed scope refuses changes for any other scope."""
    good = apply_change(None, change(1, 0, c="notes", k="n-1", s="fleet",
                                     f={"text": "hi"}), "van-1", 1, NOTES)
    assert ok(good).s == "fleet"
    bad = apply_change(None, change(1, 0, c="notes", k="n-1", s="r-1", f={"text": "hi"}),
                       "van-1", 1, NOTES)
    assert bad.rejection is not None and bad.rejection[0] == "scope_mismatch"


def test_rejected_change_leaves_the_record_untouched() -> None:
    """A rejection returns the very record passed in, unmodified."""
    rec = create(address="A")
    before = to_json(rec)
    out = apply_change(rec, change(2, 10, f={"status": "ok", "eta": "bad"}), "van-1", 2, TASKS)
    assert not out.applied and out.record is rec
    assert to_json(rec) == before
    assert out.changed == set() and out.conflicts == []


def test_apply_never_mutates_the_input_record() -> None:
    """Copy-on-write: merging into a record leaves the stored state object as it was."""
    rec = create(address="A")
    rec = ok(apply_change(rec, change(2, 10, a={"labels": ["x"]}, i={"attempts": 1}),
                          "van-1", 2, TASKS))
    before = to_json(rec)
    for ch, dev in [
        (change(1, 20, f={"status": "z", "address": "B"}, a={"labels": ["x"]}), "van-2"),
        (change(3, 30, b=2, r={"labels": {"x": ["van-1:2"]}}, i={"attempts": 1}), "van-1"),
        (change(2, 40, op="del"), "van-2"),
    ]:
        apply_change(rec, ch, dev, 3, TASKS)
        assert to_json(rec) == before


# --- rules ------------------------------------------------------------------------------


def test_rule_accept_and_no_opinion_leave_the_merge_alone() -> None:
    """A rule returning accept or None changes nothing in the outcome."""
    rec = create()
    ch = change(2, 10, b=1, f={"status": "x"})
    plain = apply_change(rec, ch, "van-1", 2, TASKS)
    for rule in (lambda ctx: RuleDecision.accept(), lambda ctx: None):
        out = apply_change(rec, ch, "van-1", 2, TASKS, rules=[rule])
        assert ok(out) == ok(plain) and not out.transformed


def test_rule_sees_the_record_before_and_after() -> None:
    """The rule context carries the change, device, spec and both record states."""
    seen: list[RuleContext] = []

    def spy(ctx: RuleContext) -> None:
        seen.append(ctx)

    rec = create()
    apply_change(rec, change(2, 10, b=1, f={"status": "x"}), "van-9", 2, TASKS, rules=[spy])
    (ctx,) = seen
    assert ctx.dev == "van-9" and ctx.spec is TASKS and ctx.before is rec
    assert ctx.after.value("status") == "x" and ctx.before.value("status") == "pending"


def test_rule_transform_merges_the_replacement_and_fixes_up_the_writer() -> None:
    """strip_strings trims values; the stored value differs so the field is in fx."""
    rec = create()
    out = apply_change(rec, change(2, 10, b=1, f={"status": "  done ", "eta": 3}), "van-1", 2,
                       TASKS, rules=[strip_strings])
    new = ok(out)
    assert new.value("status") == "done"
    assert out.transformed and out.fixups == {"status"}
    assert out.change is not None and out.change.f["status"] == "done"


def test_rule_reject_becomes_rule_rejected() -> None:
    """A rule's rejection is a rule_rejected rejection with the rule's reason."""

    def no_failed(ctx: RuleContext) -> RuleDecision | None:
        if ctx.change.f.get("status") == "failed":
            return RuleDecision.reject("status 'failed' needs a note")
        return None

    rec = create()
    out = apply_change(rec, change(2, 10, b=1, f={"status": "failed"}), "van-1", 2, TASKS,
                       rules=[no_failed])
    assert out.rejection == ("rule_rejected", "tasks/t-1: status 'failed' needs a note")
    assert out.record is rec


def test_rule_transform_into_an_invalid_change_is_rejected() -> None:
    """A transformation is validated like the original; moving the record is refused."""
    rec = create()
    ch = change(2, 10, b=1, f={"status": "x"})

    def bad_type(ctx: RuleContext) -> RuleDecision:
        return RuleDecision.transform(ctx.change.model_copy(update={"f": {"status": 1}}))

    def other_key(ctx: RuleContext) -> RuleDecision:
        return RuleDecision.transform(ctx.change.model_copy(update={"k": "t-2"}))

    out = apply_change(rec, ch, "van-1", 2, TASKS, rules=[bad_type])
    assert out.rejection is not None and out.rejection[0] == "type_mismatch"
    assert "bad_type" in out.rejection[1]
    out = apply_change(rec, ch, "van-1", 2, TASKS, rules=[other_key])
    assert out.rejection is not None and out.rejection[0] == "rule_rejected"


def test_load_rules_imports_entries_and_names_bad_ones() -> None:
    """load_rules resolves module:function entries; errors are ConfigError naming the entry."""
    assert load_rules(["waystation.rules:strip_strings"]) == [strip_strings]
    for entry, needle in [("strip_strings", "package.module:function"),
                          ("waystation.nope_missing:f", "cannot import"),
                          ("waystation.rules:nope", "no attribute"),
                          ("waystation.rules:__doc__", "not a function")]:
        with pytest.raises(ConfigError) as info:
            load_rules([entry])
        assert repr(entry) in str(info.value) and needle in str(info.value)


# --- record states and storage ----------------------------------------------------------


def busy_record() -> RecordState:
    """A record exercising every kind of field state, with an open conflict."""
    rec = create(address="A", proof={"sig": [1, 2, {"x": None}]}, price=2.5)
    steps: list[tuple[Change, str]] = [
        (change(2, 10, i={"attempts": 3, "weight": 0.25}), "van-1"),
        (change(3, 20, a={"labels": ["x", "y"]}), "van-1"),
        (change(1, 30, f={"address": "B"}, a={"labels": ["x"]}), "van-7"),
        (change(4, 40, b=4, r={"labels": {"y": ["van-1:3"], "z": ["van-9:1"]}}), "van-1"),
    ]
    for q, (ch, dev) in enumerate(steps, start=2):
        rec = ok(apply_change(rec, ch, dev, q, TASKS))
    return ok(apply_change(rec, change(5, 50, f={"eta": 1}), "van-1", 6, TASKS,
                           stamp=Stamp(T0 + 45, 0, SERVER_NODE)))


def test_to_rec_validates_as_wire_rec_whole_and_part() -> None:
    """Whole and part record states validate against schemas.wire.Rec."""
    rec = busy_record()
    whole = valid_rec(to_rec(rec))
    assert whole["f"]["labels"] == ["x"]
    assert whole["t"]["labels"] == {"x": ["van-1:3", "van-7:1"]}
    assert whole["f"]["attempts"] == 3 and whole["f"]["weight"] == 0.25
    assert set(whole["cf"]) == {"address"}
    assert "part" not in whole and "x" not in whole
    part = valid_rec(to_rec(rec, ["labels", "eta"], part=True))
    assert part["part"] is True and set(part["f"]) == {"labels", "eta"}
    assert "cf" not in part
    empty = ok(apply_change(rec, change(6, 60, b=6, r={"labels": {"x": ["van-1:3", "van-7:1"]}}),
                            "van-1", 7, TASKS))
    assert valid_rec(to_rec(empty, ["labels"], part=True))["f"] == {"labels": []}
    assert "labels" not in to_rec(empty).get("f", {})


def test_json_round_trip_is_exact() -> None:
    """from_json(to_json(r)) == r for every kind of state, through orjson bytes."""
    rec = busy_record()
    assert from_json(orjson.loads(orjson.dumps(to_json(rec)))) == rec
    dead = ok(apply_change(rec, change(7, 70, b=6, op="del"), "van-1", 7, TASKS))
    assert from_json(orjson.loads(orjson.dumps(to_json(dead)))) == dead
    removed_only = ok(apply_change(None, change(1, 0, r={"labels": {"x": ["van-2:1"]}}),
                                   "van-1", 1, TASKS))
    assert from_json(to_json(removed_only)) == removed_only
    assert to_json(rec)["fv"] == merge.FORMAT_VERSION


def test_from_json_refuses_unknown_formats_and_damage() -> None:
    """Unknown format versions and broken documents raise ValueError."""
    data = to_json(busy_record())
    with pytest.raises(ValueError, match="format version"):
        from_json({**data, "fv": 99})
    with pytest.raises(ValueError, match="damaged"):
        from_json({k: v for k, v in data.items() if k != "f"})
    with pytest.raises(ValueError):
        from_json({**data, "f": {"x": ["?", 1]}})


def test_conflict_entry_json_round_trip() -> None:
    """Conflict-log entries serialise with readable keys and read back equal."""
    entry = ConflictEntry("tasks", "t-1", "r-1", "status", "lww",
                          Version("a", Stamp(T0, 1, "van-1"), "van-1", 4),
                          Version(None, Stamp(T0, 0, SERVER_NODE), "van-2", 9), 12)
    data = orjson.loads(orjson.dumps(entry.to_json()))
    assert data["winner"]["h"] == Stamp(T0, 1, "van-1").encode()
    assert ConflictEntry.from_json(data) == entry
    deleted = ConflictEntry("tasks", "t-1", "r-1", "status", "delete", None,
                            Version("a", Stamp(T0, 1, "van-1"), "van-1", 4), 3)
    assert ConflictEntry.from_json(deleted.to_json()) == deleted


def test_state_classes_hold_what_the_store_needs() -> None:
    """Field states are the documented dataclasses with their sequences."""
    rec = busy_record()
    assert isinstance(rec.fields["attempts"], Counter) and rec.fields["attempts"].q == 2
    labels = rec.fields["labels"]
    assert isinstance(labels, SetField)
    assert labels.removed == {"y": {"van-1:3"}, "z": {"van-9:1"}}
    assert labels.members() == ["x"]
    eta = rec.fields["eta"]
    assert isinstance(eta, Register) and eta.value.by == "van-1"
    assert eta.value.h.node == SERVER_NODE


# --- equal values and edge cases --------------------------------------------------------


def test_concurrent_equal_lww_values_are_not_logged() -> None:
    """Two devices writing the same value concurrently lose nothing: no log entry."""
    rec = ok(apply_change(create(), change(1, 100, f={"status": "done"}), "van-2", 2, TASKS))
    out = apply_change(rec, change(1, 200, f={"status": "done"}), "van-3", 3, TASKS)
    assert out.conflicts == []
    late = apply_change(rec, change(1, 50, f={"status": "done"}), "van-3", 3, TASKS)
    assert late.conflicts == []


def test_manual_concurrent_equal_value_opens_no_conflict() -> None:
    """A concurrent manual write equal to the value kept opens no conflict."""
    rec = create(address="Dock 1")
    out = apply_change(rec, change(1, 100, f={"address": "Dock 1"}), "van-7", 2, TASKS)
    assert out.conflicts == [] and "cf" not in to_rec(ok(out))


def test_manual_agreeing_write_withdraws_the_devices_candidate() -> None:
    """A device that later writes the kept value withdraws its candidate; the conflict closes."""
    rec = ok(apply_change(create(address="A"), change(1, 100, f={"address": "B"}), "van-7",
                          2, TASKS))
    out = apply_change(rec, change(2, 200, f={"address": "A"}), "van-7", 3, TASKS)
    assert out.resolved == ["address"]
    assert "cf" not in to_rec(ok(out)) and ok(out).value("address") == "A"


def test_delete_between_value_and_candidate_promotes_the_candidate() -> None:
    """A candidate stamped after a delete that hides the value becomes the value."""
    rec = ok(apply_change(create(address="A"), change(1, 200, f={"address": "B"}), "van-7",
                          2, TASKS))
    out = apply_change(rec, change(2, 100, b=2, op="del"), "van-1", 3, TASKS)
    new = ok(out)
    assert not new.deleted
    assert new.value("address") == "B" and "cf" not in to_rec(new)
    assert out.resolved == ["address"] and out.whole


def test_delete_of_an_older_delete_changes_nothing_but_the_version() -> None:
    """A delete stamped before the current tombstone only bumps the version."""
    rec = ok(apply_change(create(), change(2, 100, b=1, op="del"), "van-1", 2, TASKS))
    out = apply_change(rec, change(1, 50, op="del"), "van-2", 3, TASKS)
    new = ok(out)
    assert new.deleted and new.xh == rec.xh and new.q == 3
    assert out.changed == set() and out.conflicts == []
