"""`waystation agent ...` handlers, run through the real command-line parser."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from agent.cli import cmd_watch
from schemas import wire
from tests.cli.tables import table_rows
from waystation.cli import main


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {"WAYSTATION_AGENT__DATA_DIR": str(tmp_path / "data"),
            "WAYSTATION_AGENT__DEVICE_ID": "van-1",
            "WAYSTATION_AGENT__SCOPES": '["route-42", "depot-7", "fleet"]'}


def run(env: dict[str, str], capsys: pytest.CaptureFixture[str],
        *argv: str) -> tuple[int, str, str]:
    code = main(["agent", *argv], env=env)
    out, err = capsys.readouterr()
    return code, out, err


def test_write_then_read_back(env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    """put/incr/add/remove print the change id; get/list show the record."""
    code, out, _ = run(env, capsys, "put", "tasks", "t-1", "route=route-42", "status=out",
                       "eta=1700000000000", 'proof={"sig": "abc"}')
    assert code == 0 and out == "saved locally (change van-1:1), pending sync\n"
    assert run(env, capsys, "incr", "tasks", "t-1", "attempts", "2")[1].startswith(
        "saved locally (change van-1:2)")
    assert run(env, capsys, "add", "tasks", "t-1", "labels", "fragile", "late")[0] == 0
    assert run(env, capsys, "remove", "tasks", "t-1", "labels", "late")[0] == 0
    code, out, _ = run(env, capsys, "get", "tasks", "t-1", "--json")
    doc = json.loads(out)
    assert doc["fields"] == {"route": "route-42", "status": "out", "eta": 1700000000000,
                             "proof": {"sig": "abc"}, "attempts": 2, "labels": ["fragile"]}
    assert doc["pending"] == 4
    code, out, _ = run(env, capsys, "get", "tasks", "t-1")
    assert out.splitlines()[0] == ("tasks/t-1  (scope route-42, not yet on the server, "
                                   "4 changes pending sync)")
    assert '  status    "out"  pending' in out
    code, out, _ = run(env, capsys, "list", "tasks")
    assert out.splitlines()[0].split() == ["KEY", "SYNC", "FIELDS"]
    [row] = table_rows(out, "KEY")
    assert row["KEY"] == "t-1" and row["SYNC"] == "4 pending"
    assert json.loads(row["FIELDS"]) == doc["fields"]
    deleted = run(env, capsys, "delete", "tasks", "t-1")[1]
    assert deleted.startswith("saved locally (change van-1:5)")
    assert json.loads(run(env, capsys, "list", "tasks", "--json")[1]) == []


def test_fetch_prints_what_it_has_under_headers(env: dict[str, str],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """`agent fetch` prints the records it holds as `agent list` does (a header line,
    then KEY and FIELDS), then what it asked the server for."""
    run(env, capsys, "put", "tasks", "t-1", "route=route-42", "status=out")
    code, out, _ = run(env, capsys, "fetch", "tasks", "t-1", "t-2")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["KEY", "FIELDS"]
    [row] = table_rows("\n".join(lines[:2]), "KEY")
    assert row["KEY"] == "t-1"
    assert json.loads(row["FIELDS"]) == {"route": "route-42", "status": "out"}
    assert lines[2] == "asked the server for 1 record(s): t-2"


def test_status_human_and_json(env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    """status prints the one-line summary first, or a JSON document."""
    run(env, capsys, "put", "tasks", "t-1", "route=route-42")
    code, out, _ = run(env, capsys, "status")
    assert code == 0
    assert out.splitlines()[0].startswith(
        "offline — the sync daemon has not run on this store yet (start `waystation agent "
        "run` or its service); 1 change saved locally, waiting for connection; oldest ")
    doc = json.loads(run(env, capsys, "status", "--json")[1])
    assert doc["pending"] == 1 and doc["online"] is False and doc["device_id"] == "van-1"


@pytest.mark.parametrize(("argv", "code", "message"), [
    (("put", "nope", "k", "a=1"), 2, "unknown collection 'nope'"),
    (("put", "tasks", "t-1", "route=route-42", 'proof={"a":'), 2, "looks like JSON"),
    (("put", "tasks", "t-1", "route=route-42", "eta=soon"), 2, "expected an integer"),
    (("put", "tasks", "t-1", "status=out"), 2, "scope field 'route'"),
    (("put", "tasks", "t-1", "route=elsewhere"), 2, "not one of this device's scopes"),
    (("put", "tasks", "t-1", "route=route-42", "route=route-42"), 2, "given twice"),
    (("incr", "tasks", "t-1", "status", "1"), 2, "is not a counter"),
    (("add", "tasks", "t-1", "nope", "x"), 2, "has no field 'nope'"),
    (("delete", "tasks", "t-9"), 2, "no record tasks/t-9"),
])
def test_bad_input_is_one_line_and_nonzero(env: dict[str, str],
                                           capsys: pytest.CaptureFixture[str],
                                           argv: tuple[str, ...], code: int, message: str) -> None:
    """Wrong input: one 'error:' line on stderr, non-zero exit, nothing written."""
    got, out, err = run(env, capsys, *argv)
    assert got == code
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    if Path(env["WAYSTATION_AGENT__DATA_DIR"], "agent.lmdb").exists():
        assert json.loads(run(env, capsys, "status", "--json")[1])["pending"] == 0


def test_reads_before_anything_was_written(env: dict[str, str],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Read commands on a device with no store say so in one line and exit 1, and point
    at `--config` (an agent started with a config file, and `agent status` typed without
    it in the same directory, was told only that nothing had been written yet)."""
    code, _, err = run(env, capsys, "status")
    assert code == 1 and err.startswith("error: no local store at ")
    assert "--config FILE" in err and err.count("\n") == 1
    run(env, capsys, "put", "tasks", "t-1", "route=route-42")
    code, _, err = run(env, capsys, "get", "tasks", "t-2")
    assert code == 1 and err == "error: no record tasks/t-2 on this device\n"


def test_non_numeric_amount_is_a_usage_error(env: dict[str, str],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """incr with an amount that is not a number is refused by the parser (exit 2)."""
    code, _, err = run(env, capsys, "incr", "tasks", "t-1", "attempts", "many")
    assert code == 2 and "expected a number" in err


def test_deadletters_and_conflicts_listing(env: dict[str, str], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """deadletters and conflicts list what the server refused or reported."""
    from agent.api import Agent
    from schemas.collection import example_catalog_path, load_catalog
    from waystation.config import AgentConfig, load_config

    run(env, capsys, "put", "tasks", "t-1", "route=route-42", "status=odd")
    cfg = load_config(AgentConfig, None, env)
    with Agent.open(cfg, load_catalog(example_catalog_path())) as ag:
        ag.sync.apply_reject(wire.Reject(rj=[wire.Rejection(n=1, code="rule_rejected",
                                                            reason="unknown status",
                                                            perm=True)]))
        ag.sync.apply_delta(wire.Delta(d=[wire.Rec.model_validate({
            "c": "tasks", "k": "t-5", "s": "route-42", "q": 1,
            "f": {"route": "route-42", "address": "Gate 1"},
            "h": {"address": "0190000000000000:van-3"},
            "cf": {"address": [{"v": "Dock 4", "by": "van-7",
                                "h": "0190000000010000:van-7"}]}})]))
    out = run(env, capsys, "deadletters")[1]
    assert out.splitlines()[0] == "van-1:1  rule_rejected: unknown status"
    out = run(env, capsys, "conflicts")[1]
    assert out.splitlines()[0].split() == ["STATE", "RECORD", "FIELD", "KEPT", "CONCURRENT"]
    assert table_rows(out, "STATE") == [{"STATE": "open", "RECORD": "tasks/t-5",
                                         "FIELD": "address", "KEPT": '"Gate 1"',
                                         "CONCURRENT": '"Dock 4" by van-7'}]
    assert "open: the kept value stands until a person decides" in out
    assert json.loads(run(env, capsys, "conflicts", "--json")[1])[0]["kind"] == "open"


def test_conflicts_lost_row_names_this_devices_write(
        env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A write of this device that lost is a `lost` row: the kept value, and this
    device's value with its change id under CONCURRENT."""
    from agent.api import Agent
    from schemas import codec
    from schemas.collection import example_catalog_path, load_catalog
    from tests.agent.agentkit import FakeClock
    from tests.server.helpers import make_engine
    from waystation.config import AgentConfig, load_config

    cfg = load_config(AgentConfig, None, env)
    engine, _, _ = make_engine(tmp_path / "server", {"van-1": ["route-42"],
                                                     "van-9": ["route-42"]})
    clock = FakeClock()
    with Agent.open(cfg, load_catalog(example_catalog_path()), now_ms=clock) as ag:
        ag.put("tasks", "t-1", {"route": "route-42", "status": "mine"})
        later = clock() + 60_000
        engine.handle_up("van-9", codec.encode_dict({
            "type": "changes", "v": 1, "dev": "van-9", "sv": 1, "ch": [
                {"n": 1, "h": f"{later:012x}0000", "c": "tasks", "k": "t-1",
                 "s": "route-42", "b": 0, "op": "put",
                 "f": {"route": "route-42", "status": "theirs"}}]}))
        up = codec.encode(ag.sync.next_batch().message("van-1"))
        for _, payload in engine.handle_up("van-1", up):
            msg = codec.decode(payload, allowed=wire.DOWN_TYPES)
            if isinstance(msg, wire.Ack):
                ag.sync.apply_ack(msg)
    out = run(env, capsys, "conflicts")[1]
    assert table_rows(out, "STATE") == [{"STATE": "lost", "RECORD": "tasks/t-1",
                                         "FIELD": "status", "KEPT": '"theirs"',
                                         "CONCURRENT": '"mine" by this device (van-1:1)'}]
    assert out.splitlines()[-1] == "lost: this device's write lost to the kept value"


def test_watch_prints_events(env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    """watch prints one line per event (here stopped by a timeout instead of Ctrl-C)."""
    run(env, capsys, "put", "tasks", "t-1", "route=route-42")
    run(env, capsys, "put", "inspections", "i-1", "vehicle=v")
    args = argparse.Namespace(config=None, collection="tasks", json=True, timeout=0.05, since=0)
    assert cmd_watch(args, env) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line) for line in lines] == [
        {"seq": 1, "collection": "tasks", "key": "t-1", "kind": "local",
         "data": {"change_ids": ["van-1:1"]}}]


def test_deadletters_show_their_transaction(env: dict[str, str],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A transaction the server refused is listed as one: each change names it."""
    from agent.api import Agent
    from schemas.collection import example_catalog_path, load_catalog
    from waystation.config import AgentConfig, load_config

    cfg = load_config(AgentConfig, None, env)
    with Agent.open(cfg, load_catalog(example_catalog_path())) as ag:
        with ag.transaction() as tx:
            tx.put("tasks", "o-1", {"route": "route-42", "status": "ordered"})
            tx.put("tasks", "o-1:1", {"route": "route-42", "notes": "2 x A"})
        ag.sync.apply_reject(wire.Reject(rj=[wire.Rejection(
            n=2, code="rule_rejected", reason="a line needs a sku", perm=True)]))
    out = run(env, capsys, "deadletters")[1].splitlines()
    assert out[0].startswith("van-1:1  txn_aborted: transaction van-1:1 was rejected as a "
                             "whole: change van-1:2 was refused (rule_rejected: a line")
    assert out[2] == "  in transaction van-1:1"
    assert out[3] == "van-1:2  rule_rejected: a line needs a sku"
    assert out[5] == "  in transaction van-1:1"
    letters = json.loads(run(env, capsys, "deadletters", "--json")[1])
    assert {d["transaction"] for d in letters} == {"van-1:1"}


def test_sync_now_from_the_cli(env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    """`agent sync` records the request; without a running daemon it says to start one."""
    assert run(env, capsys, "put", "tasks", "t-1", "route=route-42")[0] == 0
    code, out, _ = run(env, capsys, "sync", "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["requested_ms"] > 0 and doc["pending"] == 1 and doc["deferred"] == []
    code, out, _ = run(env, capsys, "sync")
    assert code == 0 and "the sync daemon is not running" in out


def test_no_store_yet_with_a_config_says_to_start_the_agent(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Step 7 of the guide: `agent status --config /etc/waystation/agent-van-12.toml`
    before the agent first ran was told to "give this command the same `--config FILE`",
    which it had been given."""
    from waystation.cli import main

    cfg = tmp_path / "van-1.toml"
    cfg.write_text('device_id = "van-1"\ndata_dir = "van-1-data"\n')
    assert main(["agent", "status", "--config", str(cfg)], env={}) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: no local store at {tmp_path / 'van-1-data'}")
    assert "give this command the same" not in err and err.count("\n") == 1
    assert f"waystation agent run --config {cfg}" in err


def test_deadletters_list_says_what_the_change_did_in_words(
        env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    """The list printed the change's wire groups (`put inventory/sku-1 {"i":{"stock":-5}}`
    for an increment); it says what `show` says, with the app's words."""
    from agent.api import Agent
    from schemas.collection import example_catalog_path, load_catalog
    from waystation.config import AgentConfig, load_config

    run(env, capsys, "put", "inventory", "sku-1", "depot=depot-7", "name=flour")
    run(env, capsys, "incr", "inventory", "sku-1", "stock", "-5")
    cfg = load_config(AgentConfig, None, env)
    with Agent.open(cfg, load_catalog(example_catalog_path())) as ag:
        ag.sync.apply_reject(wire.Reject(rj=[wire.Rejection(
            n=2, code="rule_rejected", reason="stock would go below 0", perm=True)]))
    out = run(env, capsys, "deadletters")[1].splitlines()
    assert out[0] == "van-1:2  rule_rejected: stock would go below 0"
    assert out[1] == "  put inventory/sku-1: add to counter stock -5"
    shown = run(env, capsys, "deadletters", "show", "2")[1]
    assert "  add to counter stock: -5\n" in shown
