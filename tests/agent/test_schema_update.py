"""The agent takes a schema version the server sends (capability `schema_push`,
PROTOCOL.md §7.13, agent.schema_update): checked first, applied in one LMDB
transaction (records, pending changes, views), refused with no change when it does not
fit, and undone when the server rolls the version back."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import orjson
import pytest

from agent.api import Agent
from agent.core import Work
from agent.query.errors import IndexRequired
from agent.store import record_key
from schemas import codec, wire
from schemas.collection import Catalog, parse_catalog
from schemas.errors import ProtocolError
from tests.agent.agentkit import FakeClock, assert_views_consistent, make_cfg, rec
from tests.agent.crashing import kill_when_ready
from tests.schema_versions import V1, V2, V3, V4

TEXTS = {1: V1, 2: V2, 3: V3, 4: V4}
AGREED = wire.Welcome(caps=["schema", "schema_push"], sv=3, sv_min=1)


def push(version: int, text: str | None = None) -> wire.SchemaPush:
    return wire.SchemaPush(sv=version, text=TEXTS[version] if text is None else text)


def cat(version: int) -> Catalog:
    return parse_catalog(tomllib.loads(TEXTS[version]), f"v{version}")


def snapshot(ag: Agent) -> dict[str, Any]:
    """Everything the schema change may touch, to compare before and after."""
    def run(work: Work) -> dict[str, Any]:
        tx = work.tx
        return {db: list(tx.items(db)) for db in ("base", "stamps", "view", "outbox")} | {
            "sv": tx.meta("sv"), "schema": tx.meta("schema"), "schemas": tx.meta("schemas")}

    return ag._core.read(run)


@pytest.fixture
def v2(tmp_path: Path, clock: FakeClock) -> Any:
    """A device on version 2 with a record from the server (`notes` set) and a pending
    write of its own to `notes`, that agreed schema_push with its server."""
    ag = Agent.open(make_cfg(tmp_path / "data"), cat(2), now_ms=clock)
    ag.sync.apply_delta(wire.Delta(d=[rec("t-1", 1, {"route": "route-42", "notes": "gate",
                                                     "eta": 17})]))
    ag.put("tasks", "t-2", {"route": "route-42", "notes": "mine", "eta": 5})
    ag.sync.apply_welcome(AGREED)
    yield ag
    ag.close()


def test_rename_rewrites_records_pending_changes_and_views(v2: Agent) -> None:
    """Version 3 renames tasks.notes -> note: the server's record, the device's own
    pending write and both views carry the new name; the write is sent as version 3."""
    taken = v2.sync.take_schema(push(3))
    assert taken is not None and taken.changed and (taken.previous, taken.sv) == (2, 3)
    assert v2.catalog.version == 3
    assert v2.get("tasks", "t-1").fields["note"] == "gate"
    assert "notes" not in v2.get("tasks", "t-1").fields
    assert v2.get("tasks", "t-2").fields["note"] == "mine"
    [entry] = v2.pending()
    assert entry["sv"] == 3 and entry["ch"]["f"] == {"route": "route-42", "note": "mine",
                                                     "eta": 5}
    assert_views_consistent(v2)
    assert v2.sync.hello("t").sv == 3 and v2.status().schema_version == 3
    v2.put("tasks", "t-3", {"route": "route-42", "note": "new name"})
    with pytest.raises(Exception, match="notes"):
        v2.put("tasks", "t-3", {"notes": "old name"})


def test_convert_carries_values_and_a_second_step_follows(v2: Agent) -> None:
    """3 then 4 (eta int -> string): values converted in the base and the outbox."""
    v2.sync.take_schema(push(3))
    taken = v2.sync.take_schema(push(4))
    assert taken is not None and taken.changed
    assert v2.get("tasks", "t-1").fields["eta"] == "17"
    assert v2.pending()[0]["ch"]["f"]["eta"] == "5" and v2.pending()[0]["sv"] == 4
    assert_views_consistent(v2)


def test_the_same_version_again_changes_nothing(v2: Agent) -> None:
    before = snapshot(v2)
    taken = v2.sync.take_schema(push(2))
    assert taken is not None and not taken.changed and snapshot(v2) == before


def test_without_the_agreement_the_message_is_ignored(tmp_path: Path, clock: FakeClock) -> None:
    """A server that did not agree schema_push on this connection changes nothing."""
    ag = Agent.open(make_cfg(tmp_path / "d"), cat(2), now_ms=clock)
    try:
        ag.sync.apply_welcome(wire.Welcome(caps=["schema"], sv=3))
        before = snapshot(ag)
        assert ag.sync.take_schema(push(3)) is None
        assert snapshot(ag) == before and ag.catalog.version == 2
    finally:
        ag.close()


HOSTILE = {
    "not toml": (3, "version = 3\n[collections.tasks\n"),
    "version differs from sv": (5, V3),
    # v3 without its [[migrations]]: `notes` is gone and nothing says where to
    "breaking change without migration": (3, "version = 3\n" + V3.split('to = "note"\n', 1)[1]),
    "skips a step it cannot follow": (4, V4),
    "not a schema": (3, "version = 3\n[collections.tasks]\nscope_field = 7\n"),
    "lower version never held": (1, V1),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_version_that_does_not_fit_is_refused_with_no_change(v2: Agent, case: str) -> None:
    """Refused: the device keeps its version and data, and says why in its status."""
    sv, text = HOSTILE[case]
    before = snapshot(v2)
    taken = v2.sync.take_schema(wire.SchemaPush(sv=sv, text=text))
    assert taken is not None and not taken.changed and taken.problem
    after = snapshot(v2)
    assert after == before and v2.catalog.version == 2
    err = v2.status().last_error
    assert err is not None and err["code"] == "schema_refused" and err["reason"] == taken.problem
    assert f"schema version refused: {taken.problem}" in v2.status().summary()
    # Once a version that fits arrives, the problem is cleared.
    assert v2.sync.take_schema(push(3)).changed  # type: ignore[union-attr]
    assert v2.status().last_error is None


@pytest.mark.parametrize("doc", [
    {"sv": 3},
    {"sv": 3, "text": ""},
    {"sv": -1, "text": V3},
    {"sv": "3", "text": V3},
    {"sv": 3, "text": 7},
    {"sv": 3, "text": "x" * (wire.MAX_SCHEMA_PUSH_TEXT + 1)},
    {"sv": 2**53, "text": V3},
])
def test_malformed_schema_messages_are_refused_by_the_codec(doc: dict[str, Any]) -> None:
    """Bounded, typed: such a message never reaches the store."""
    with pytest.raises(ProtocolError):
        codec.decode(orjson.dumps({"type": "schema", "v": 1, **doc}), allowed=wire.DOWN_TYPES)


def test_a_crash_before_the_commit_leaves_the_old_version(v2: Agent,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole change is one transaction: a failure half-way through (after records
    were rewritten) leaves version 2 and its data as they were."""
    before = snapshot(v2)
    calls = []

    def boom(self: Work, *args: Any) -> Any:
        calls.append(args)
        raise OSError("power cut")

    monkeypatch.setattr(Work, "refresh_view", boom)
    with pytest.raises(OSError, match="power cut"):
        v2.sync.take_schema(push(3))
    monkeypatch.undo()
    assert calls and snapshot(v2) == before and v2.catalog.version == 2
    assert v2.sync.take_schema(push(3)).changed  # type: ignore[union-attr]


def test_the_taken_version_survives_a_restart_and_reaches_other_processes(
        v2: Agent, tmp_path: Path, clock: FakeClock) -> None:
    """Another process on the store switches at its next transaction; a process opened
    later with the old schema file runs the taken version; a newer file still wins."""
    other = Agent.open(make_cfg(tmp_path / "data"), cat(2), now_ms=clock)
    try:
        v2.sync.take_schema(push(3))
        assert other.get("tasks", "t-1").fields["note"] == "gate"
        assert other.catalog.version == 3
    finally:
        other.close()
    again = Agent.open(make_cfg(tmp_path / "data"), cat(1), now_ms=clock)
    try:
        assert again.catalog.version == 3
    finally:
        again.close()
    newer = Agent.open(make_cfg(tmp_path / "data"), cat(4), now_ms=clock)
    try:
        assert newer.catalog.version == 4
    finally:
        newer.close()


def test_rollback_goes_back_down_through_the_versions_taken(v2: Agent) -> None:
    """Taken 3 and 4, then the server rolls back to 2: names and types are undone in
    the records and the pending writes, which are relabelled 2."""
    v2.sync.take_schema(push(3))
    v2.sync.take_schema(push(4))
    v2.put("tasks", "t-4", {"route": "route-42", "note": "on four", "eta": "12"})
    taken = v2.sync.take_schema(push(2))
    assert taken is not None and taken.changed and v2.catalog.version == 2
    t1 = v2.get("tasks", "t-1").fields
    assert t1["notes"] == "gate" and t1["eta"] == 17 and "note" not in t1
    by_key = {e["ch"]["k"]: e for e in v2.pending()}
    assert by_key["t-4"]["sv"] == 2 and by_key["t-4"]["ch"]["f"] == {
        "route": "route-42", "notes": "on four", "eta": 12}
    assert by_key["t-2"]["ch"]["f"]["notes"] == "mine"
    assert_views_consistent(v2)


def test_each_version_taken_is_a_schema_feed_event(v2: Agent) -> None:
    """Every version taken, up or back down, is a `schema` feed event {from, to} in the
    transaction that rewrote the records (an app reloads its field names on it, and
    reads the records under the new names right after it); the same version again and a
    refused one are none."""
    seen: list[tuple[dict[str, Any], str]] = []
    for version in (3, 3, 4, 2, 4, 2):  # 3 again, 4 after 2 (no step): none taken
        pos = v2.feed_position()
        v2.sync.take_schema(push(version))
        seen += [(e.data, next(iter(v2.get("tasks", "t-1").fields.keys() & {"note", "notes"})))
                 for e in v2.feed_after(pos) if e.kind == "schema"]
    assert seen == [({"from": 2, "to": 3}, "note"), ({"from": 3, "to": 4}, "note"),
                    ({"from": 4, "to": 2}, "notes")]
    assert {(e.collection, e.key) for e in v2.feed_after(0) if e.kind == "schema"} == {("", "")}


def test_rollback_of_a_version_from_the_schema_file_is_refused(tmp_path: Path,
                                                               clock: FakeClock) -> None:
    """A device that runs version 3 from its file holds no migrations to go back."""
    ag = Agent.open(make_cfg(tmp_path / "d"), cat(3), now_ms=clock)
    try:
        ag.sync.apply_welcome(AGREED)
        taken = ag.sync.take_schema(push(2))
        assert taken is not None and not taken.changed
        assert "install version 2's schema file" in (taken.problem or "")
        assert ag.catalog.version == 3
    finally:
        ag.close()


def test_a_dropped_collection_leaves_the_device(v2: Agent) -> None:
    """A version that drops a collection removes its local records in the same step."""
    v2.sync.apply_delta(wire.Delta(d=[rec("i-1", 2, {"vehicle": "van-1", "result": "pass"},
                                          c="inspections", s="fleet")]))
    assert v2.get("inspections", "i-1") is not None
    text = V2.replace("version = 2", "version = 3\n[[migrations]]\nop = \"drop_collection\"\n"
                      "collection = \"inspections\"\n")
    text = text[:text.index("[collections.inspections]")]
    taken = v2.sync.take_schema(wire.SchemaPush(sv=3, text=text))
    assert taken is not None and taken.changed, taken
    assert v2.catalog.collection("inspections") is None
    rk = record_key("inspections", "i-1")
    assert v2._core.read(lambda work: work.tx.get("base", rk)) is None
    assert v2._core.read(lambda work: work.tx.get("view", rk)) is None


def test_kill_9_while_taking_a_version_leaves_the_old_one(tmp_path: Path) -> None:
    """A real crash (SIGKILL) after the records were rewritten, before the commit: the
    store opens on version 2 with its data as it was, and takes version 3 afterwards."""
    data, ready = tmp_path / "data", tmp_path / "ready"
    kill_when_ready("schema_crasher.py", data, ready)
    with Agent.open(make_cfg(data), cat(2)) as ag:
        assert ag.catalog.version == 2
        assert ag.get("tasks", "t-1").fields["notes"] == "gate"
        assert [(e["sv"], e["ch"]["f"]["notes"]) for e in ag.pending()] == [(2, "mine")]
        assert ag._core.read(lambda work: work.tx.meta("schema")) is None
        assert_views_consistent(ag)
        ag.sync.apply_welcome(AGREED)
        assert ag.sync.take_schema(push(3)).changed  # type: ignore[union-attr]
        assert ag.get("tasks", "t-1").fields["note"] == "gate"


def test_index_required_on_a_taken_version_says_to_publish_the_index(v2: Agent) -> None:
    """A device running a version it took from the server ignores its schema file's
    indexes (docs/QUERIES.md): the refusal says to publish the index, not to add it to
    the file and reopen the store, which would change nothing."""
    v2.sync.take_schema(push(3))
    with pytest.raises(IndexRequired) as refused:
        v2.query({"collection": "tasks", "where": {"note": "gate"}})
    message = str(refused.value)
    assert "schema version 3 taken from the server" in message, message
    assert "schema publish" in message and "next opens the store" not in message, message
