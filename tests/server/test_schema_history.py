"""The server-owned schema history in both stores, and `waystation schema publish /
diff / history / rollback` (broker.server.schema_history, broker.schema_cli)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from broker.server import schema_history
from broker.server.store import open_store
from broker.server.store.base import DeviceRow, SchemaVersionRow, Store
from schemas.errors import CollectionSchemaError, SchemaEvolutionError
from tests.server.conftest import reopen
from waystation.cli import main
from waystation.config import ServerConfig, load_config

V1 = """version = 1
[collections.tasks]
scope_field = "route"
[collections.tasks.fields]
route = { type = "string" }
eta = { type = "int" }
notes = { type = "string" }
"""
V2 = V1.replace("version = 1", "version = 2") + 'added = { type = "bool" }\n'
V3_RENAME = """version = 3
[[migrations]]
op = "rename"
collection = "tasks"
from = "notes"
to = "note"
[collections.tasks]
scope_field = "route"
[collections.tasks.fields]
route = { type = "string" }
eta = { type = "int" }
note = { type = "string" }
added = { type = "bool" }
"""
V3_BREAKING = V2.replace("version = 2", "version = 3").replace(
    'eta = { type = "int" }', 'eta = { type = "string" }')
V4_REMOVE = """version = 4
[[migrations]]
op = "remove"
collection = "tasks"
field = "added"
[collections.tasks]
scope_field = "route"
[collections.tasks.fields]
route = { type = "string" }
eta = { type = "int" }
note = { type = "string" }
"""


def test_store_keeps_schema_rows_across_reopen(store: Store) -> None:
    row = SchemaVersionRow(3, 1000, "fleet.toml", V1)
    store.transact(lambda t: t.put_schema_version(row))
    store.transact(lambda t: t.put_schema_version(SchemaVersionRow(1, 5, "a", "x")))
    store.close()
    again = reopen(store)
    try:
        with again.read() as txn:
            assert txn.schema_versions() == [SchemaVersionRow(1, 5, "a", "x"), row]
        # Replacing a row (rollback marks it) keeps one row per version.
        again.transact(lambda t: t.put_schema_version(
            SchemaVersionRow(3, 1000, "fleet.toml", V1, rolled_back_ms=7)))
        with again.read() as txn:
            assert [r.rolled_back_ms for r in txn.schema_versions()] == [0, 7]
    finally:
        again.close()


def test_publish_checks_each_version_against_the_live_one(store: Store) -> None:
    first = schema_history.publish(store, V1, "v1.toml", 10)
    assert (first.version, first.previous, first.differences) == (1, None, [])
    second = schema_history.publish(store, V2, "v2.toml", 20)
    assert second.previous == 1
    assert [(d.kind, d.field) for d in second.differences] == [("new_field", "added")]
    with pytest.raises(SchemaEvolutionError, match="breaking change without a migration"):
        schema_history.publish(store, V3_BREAKING, "bad.toml", 30)
    third = schema_history.publish(store, V3_RENAME, "v3.toml", 40)
    assert {d.kind for d in third.differences} == {"removed_field", "new_field"}
    live = schema_history.current(store)
    assert live is not None and live.row.version == 3 and live.migrations[0].op == "rename"
    with pytest.raises(SchemaEvolutionError, match=r"already published.*version = 4"):
        schema_history.publish(store, V3_RENAME, "v3.toml", 50)


@pytest.mark.parametrize("text,message", [
    ("version = ", "not valid TOML"),
    ("version = 1\n", "no collections"),
    (V1 + '[[migrations]]\nop = "remove"\ncollection = "tasks"\nfield = "eta"\n',
     "first published version cannot declare migrations"),
    ("x" * (schema_history.MAX_SCHEMA_TEXT + 1), "at most"),
])
def test_publish_refuses_bad_files_and_stores_nothing(store: Store, text: str,
                                                       message: str) -> None:
    with pytest.raises(CollectionSchemaError, match=message):
        schema_history.publish(store, text, "bad.toml", 1)
    with store.read() as txn:
        assert txn.schema_versions() == []


def test_rollback_when_no_device_ran_it(store: Store) -> None:
    schema_history.publish(store, V1, "v1.toml", 10)
    with pytest.raises(SchemaEvolutionError, match="nothing to roll back"):
        schema_history.rollback(store, 15)
    schema_history.publish(store, V2, "v2.toml", 20)
    schema_history.publish(store, V3_RENAME, "v3.toml", 30)
    schema_history.publish(store, V4_REMOVE, "v4.toml", 40)
    assert schema_history.rollback(store, 50) == (4, 3)
    live = schema_history.current(store)
    assert live is not None and live.row.version == 3
    # The rolled-back number is not reused.
    with pytest.raises(SchemaEvolutionError, match=r"was rolled back.*version = 5"):
        schema_history.publish(store, V4_REMOVE, "v4.toml", 60)
    schema_history.publish(store, V4_REMOVE.replace("version = 4", "version = 5"), "v5", 70)


def test_rollback_after_devices_ran_it_needs_an_inverse(store: Store) -> None:
    for n, text in enumerate((V1, V2, V3_RENAME, V4_REMOVE)):
        schema_history.publish(store, text, f"v{n + 1}.toml", 10 * n)
    store.transact(lambda t: t.put_device(DeviceRow("van-1", ("r1",), sv=4)))
    with pytest.raises(SchemaEvolutionError, match=r"devices have run it \(van-1\).*'remove'"):
        schema_history.rollback(store, 100)
    live = schema_history.current(store)
    assert live is not None and live.row.version == 4
    # A rename has an inverse: version 3 can be rolled back although van-1 ran it.
    store.transact(lambda t: t.put_device(DeviceRow("van-1", ("r1",), sv=3)))
    store.transact(lambda t: t.put_schema_version(SchemaVersionRow(
        4, 30, "v4.toml", V4_REMOVE, rolled_back_ms=1)))
    assert schema_history.rollback(store, 200) == (3, 2)


# --- the commands -------------------------------------------------------------------


@pytest.fixture
def env(server_cli_env: dict[str, str]) -> dict[str, str]:
    """The CLI's environment, on an LMDB store and on a fresh PostgreSQL database."""
    return server_cli_env


def _files(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name, text in (("v1", V1), ("v2", V2), ("v3", V3_RENAME), ("bad", V3_BREAKING),
                       ("v4", V4_REMOVE)):
        out[name] = tmp_path / f"{name}.toml"
        out[name].write_text(text)
    return out


def test_schema_commands_end_to_end(env: dict[str, str], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    f = _files(tmp_path)

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv), env=env)
        out = capsys.readouterr()
        return code, out.out, out.err

    code, out, _ = run("schema", "diff", str(f["v2"]), str(f["bad"]))
    assert code == 1 and "BREAKING   type_change" in out and "publishable: no" in out
    code, out, _ = run("schema", "diff", "--json", str(f["v2"]), str(f["v3"]))
    doc = json.loads(out)
    assert code == 0 and doc["publishable"] is True
    assert {(d["kind"], d["field"]) for d in doc["differences"]} == {
        ("removed_field", "notes"), ("new_field", "note")}
    assert doc["migrations"] == [{"op": "rename", "collection": "tasks", "from": "notes",
                                  "to": "note"}]

    assert run("schema", "history")[1].startswith("no schema published yet")
    code, out, _ = run("schema", "publish", str(f["v1"]))
    assert code == 0 and "published schema version 1 (the first" in out
    # devices on an unpublished older version are told sv_min 1 (PROTOCOL.md §11)
    assert "devices on a version below 1 hold their changes as too old" in out
    code, out, _ = run("schema", "publish", "--json", str(f["v2"]))
    assert code == 0 and json.loads(out)["previous"] == 1
    code, out, err = run("schema", "publish", str(f["bad"]))
    assert code == 2 and "breaking change without a migration" in err
    assert 'op = "convert"' in err
    assert run("schema", "publish", str(f["v3"]))[0] == 0

    code, out, _ = run("schema", "history", "--json")
    doc = json.loads(out)
    assert doc["live"] == 3 and [v["version"] for v in doc["versions"]] == [1, 2, 3]
    code, out, _ = run("schema", "rollback", "--json")
    assert code == 0 and json.loads(out) == {"rolled_back": 3, "live": 2}
    code, out, _ = run("schema", "history")
    lines = out.splitlines()
    assert lines[0].split() == ["VERSION", "PUBLISHED", "DEVICES", "ON", "IT", "STATE", "FROM",
                                "FILE"]
    assert lines[2].split()[0] == "2" and "LIVE" in lines[2]
    assert lines[3].split()[0] == "3" and "rolled back" in lines[3]

    store = open_store(load_config(ServerConfig, None, env))
    try:
        live = schema_history.current(store)
        assert live is not None and live.row.version == 2
    finally:
        store.close()


def test_schema_commands_refuse_hostile_files(env: dict[str, str], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    huge = tmp_path / "huge.toml"
    huge.write_bytes(b"#" * (schema_history.MAX_SCHEMA_TEXT + 10))
    for argv in (["schema", "publish", str(binary)], ["schema", "publish", str(huge)],
                 ["schema", "publish", str(tmp_path / "missing.toml")],
                 ["schema", "diff", str(binary), str(huge)]):
        code = main(argv, env=env)
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err
    store = open_store(load_config(ServerConfig, None, env))
    try:
        with store.read() as txn:
            assert txn.schema_versions() == []
    finally:
        store.close()
