"""Password rotation on a RabbitMQ fleet without RabbitMQ (`enrol.broker_kind =
"rabbitmq"`): the switch hands one definitions document to `enrol.rabbitmq_import` on
its standard input, never the password and never on a command line; a failing import is
retried at every tick, noted in the store (status, device list) and cleared once it
works; the config refuses what cannot work; `device add`, `rotate-password` and `device
remove` need no password file; the definitions command keeps rotated passwords."""

from __future__ import annotations

import json
import stat
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import structlog

from broker.rabbitmq.definitions import HASHING, hash_password
from broker.rabbitmq.definitions import main as definitions_main
from broker.server import devstate, rotation
from broker.server.rotation import Rotation
from broker.server.rotation_files import ERROR_REPEAT_MS, advance, broker_logins
from broker.server.rotation_rabbitmq import RabbitLogins, users_document, valid_hash
from broker.server.store.base import Store
from tests.helpers import wait_until
from tests.server.conftest import StoreFactory
from tests.server.helpers import make_engine
from waystation.cli import main
from waystation.config import ServerConfig, load_config
from waystation.errors import ConfigError

NEW = "new-password-ABCDEFGHIJ"


def _recorder(tmp_path: Path, *, fail_flag: Path | None = None) -> list[str]:
    """An import command that appends each document it reads to `imports.jsonl` and
    its argv to `argv.json`; exits 3 with a message while `fail_flag` exists."""
    script = tmp_path / "fake_import.py"
    script.write_text(
        "import json, os, sys\n"
        f"flag = {str(fail_flag) if fail_flag else ''!r}\n"
        "if flag and os.path.exists(flag):\n"
        "    print('Error: unable to connect to node rabbit@mq-1: nodedown', file=sys.stderr)\n"
        "    sys.exit(3)\n"
        f"with open({str(tmp_path / 'imports.jsonl')!r}, 'a') as fh:\n"
        "    fh.write(json.dumps(json.load(sys.stdin)) + '\\n')\n"
        f"with open({str(tmp_path / 'argv.json')!r}, 'w') as fh:\n"
        "    json.dump(sys.argv, fh)\n")
    return [sys.executable, str(script), "import_definitions"]


def _imports(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "imports.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def _rot(store: Store, dev: str = "van-1") -> Rotation:
    with store.read() as txn:
        row = txn.get_device(dev)
    assert row is not None
    rot = Rotation.from_json(row.rot)
    assert rot is not None
    return rot


def test_switch_imports_only_the_users_hash_through_stdin(tmp_path: Path) -> None:
    """One import for all due users; the document sets hash, algorithm, no tags; neither
    the password nor the hash is on the command line."""
    argv = _recorder(tmp_path)
    logins = RabbitLogins(tuple(argv))
    h1, h2 = hash_password(NEW), hash_password("other-password-0123")
    assert logins.switch_many([("van-1", h1), ("van.2", h2)]) == {}
    assert _imports(tmp_path) == [users_document([("van-1", h1), ("van.2", h2)])]
    user = _imports(tmp_path)[0]["users"][0]
    assert user == {"name": "van-1", "password_hash": h1, "hashing_algorithm": HASHING,
                    "tags": [], "limits": {}}
    recorded = json.loads((tmp_path / "argv.json").read_text())
    assert recorded[1:] == ["import_definitions"]
    assert NEW not in (tmp_path / "imports.jsonl").read_text()


# A truncated real hash: fixed bytes (a freshly salted one would give each xdist worker
# a different test id, and xdist refuses to run when the workers' collections differ).
_TRUNCATED_HASH = "ssC4yQXA5eeibdXxwa5+XWiSYU0G14EmvhW5B84z13GO"


@pytest.mark.parametrize("bad", ["", "not base64 !", "$7$101$abc$def", "AAAA",
                                 _TRUNCATED_HASH, "é" * 48])
def test_a_hash_that_is_not_rabbitmqs_is_refused_without_an_import(tmp_path: Path,
                                                                   bad: str) -> None:
    argv = _recorder(tmp_path)
    good = hash_password(NEW)
    assert not valid_hash(bad) and valid_hash(good)
    errors = RabbitLogins(tuple(argv)).switch_many([("van-1", bad), ("van-2", good)])
    assert set(errors) == {"van-1"} and "rotate-password again" in errors["van-1"]
    assert [u["name"] for u in _imports(tmp_path)[0]["users"]] == ["van-2"]


def test_import_failures_say_why(tmp_path: Path) -> None:
    """Exit status with its output, a missing program, a command that hangs."""
    flag = tmp_path / "down"
    flag.touch()
    pairs = [("van-1", hash_password(NEW))]
    errors = RabbitLogins(tuple(_recorder(tmp_path, fail_flag=flag))).switch_many(pairs)
    assert "exited with 3" in errors["van-1"] and "nodedown" in errors["van-1"]
    missing = RabbitLogins((str(tmp_path / "no-such-rabbitmqctl"),)).switch_many(pairs)
    assert "could not be run" in missing["van-1"]
    hangs = RabbitLogins((sys.executable, "-c", "import time; time.sleep(30)"),
                         timeout_s=0.5).switch_many(pairs)
    assert "did not finish within" in hangs["van-1"]


def test_a_failing_switch_is_retried_noted_and_then_done(tmp_path: Path,
                                                         store_factory: StoreFactory) -> None:
    """Stored by the device, the import fails: stage stays "stored", the failure is in
    the row (status/device list) and logged once per interval; once the import works:
    switched, failure cleared; the device's login with the new one retires it (nothing
    more to import)."""
    engine, store, _ = make_engine(tmp_path, {"van-1": ["r1"]}, store=store_factory())
    flag = tmp_path / "down"
    flag.touch()
    logins = RabbitLogins(tuple(_recorder(tmp_path, fail_flag=flag)))
    new_hash = hash_password(NEW)
    rot, cmd = rotation.start(store, "van-1", NEW, new_hash, 1000, retire_after_s=None)
    logins.begin("van-1", new_hash)  # nothing to do before the switch
    assert _imports(tmp_path) == []
    engine.tick()
    assert advance(store, engine.registry, logins, 2000) == 0  # not stored yet: nothing due
    _set_rot(store, rotation.on_hello(rot, {cmd.id}, None, 2500))
    engine.tick()
    failing: dict[str, int] = {}
    with structlog.testing.capture_logs() as logs:
        for now in (3000, 4000, 3000 + ERROR_REPEAT_MS):
            assert advance(store, engine.registry, logins, now, failing) == 0
            engine.tick()
    failed = [e for e in logs if e["event"] == "password_rotation_step_failed"]
    assert len(failed) == 2 and failed[0]["step"] == "switch"
    assert "nodedown" in failed[0]["error"] and "rabbitmq_import" in failed[0]["hint"]
    assert _rot(store).stage == "stored"
    with store.read() as txn:
        row = txn.get_device("van-1")
    assert row is not None
    doc = devstate.rotation_doc(row)
    assert doc is not None and doc["failing"] is not None
    assert "nodedown" in doc["failing"]["error"]
    assert "password rotation: stored, its next step failing (" in devstate.lifecycle(row)

    flag.unlink()
    assert advance(store, engine.registry, logins, 3000 + 2 * ERROR_REPEAT_MS, failing) == 1
    engine.tick()
    after = _rot(store)
    assert after.stage == "switched" and not after.failed and not after.error
    assert failing == {}
    assert _imports(tmp_path) == [users_document([("van-1", new_hash)])]
    _set_rot(store, rotation.on_hello(after, set(), after.id, 10**7))
    engine.tick()
    assert advance(store, engine.registry, logins, 10**7 + 1) == 1
    assert _rot(store).stage == "retired" and not _rot(store).forced
    assert len(_imports(tmp_path)) == 1  # retiring imports nothing


def test_in_the_background_an_import_never_holds_up_the_tick(
        tmp_path: Path, store_factory: StoreFactory) -> None:
    """The server's mode: a slow import (a node far away, rabbitmqctl finding a node
    down) runs in its own thread; the tick returns at once, reports nothing until the
    import ended, starts no second import meanwhile; a failed one is reported at the tick
    after it ended (once) and tried again at the next; one that works is recorded once,
    with the hash of the rotation current by then."""
    engine, store, _ = make_engine(tmp_path, {"van-1": ["r1"], "van-2": ["r1"]},
                                   store=store_factory())
    gate, fail = tmp_path / "gate", tmp_path / "fail"
    script = tmp_path / "slow_import.py"
    script.write_text(
        "import json, os, sys, time\n"
        "doc = json.load(sys.stdin)\n"
        f"while os.path.exists({str(gate)!r}):\n"
        "    time.sleep(0.02)\n"
        f"with open({str(tmp_path / 'imports.jsonl')!r}, 'a') as fh:\n"
        "    fh.write(json.dumps(doc) + '\\n')\n"
        f"sys.exit(5 if os.path.exists({str(fail)!r}) else 0)\n")
    logins = RabbitLogins((sys.executable, str(script)), background=True)
    first = {}
    for dev in ("van-1", "van-2"):
        rot, cmd = rotation.start(store, dev, NEW, hash_password(NEW), 1000,
                                  retire_after_s=None)
        first[dev] = rot.new_hash
        _set_rot(store, rotation.on_hello(rot, {cmd.id}, None, 1500), dev)
    engine.tick()
    gate.touch()
    fail.touch()
    failing: dict[str, int] = {}
    with structlog.testing.capture_logs() as logs:
        started = time.monotonic()
        for now in range(2000, 2010):
            assert advance(store, engine.registry, logins, now, failing) == 0
        assert time.monotonic() - started < 2.0  # ten ticks, none waited for the import
        assert not logs
        gate.unlink()
        wait_until(lambda: (job := logins._imports._job) is not None and job.done.is_set(),
                   30, message="the import ended")
        assert advance(store, engine.registry, logins, 3000, failing) == 0
    assert sorted(e["dev"] for e in logs if e["event"] == "password_rotation_step_failed") \
        == ["van-1", "van-2"]
    assert _rot(store, "van-1").failed == 3000 and "exited with 5" in _rot(store, "van-1").error
    assert len(_imports(tmp_path)) == 1  # one import for both, never a second meanwhile
    assert logins._imports._job is None  # reported, not started again in the same tick

    fail.unlink()
    engine.tick()
    rot2, cmd2 = rotation.start(store, "van-2", "third-password-012345",
                                hash_password("third-password-012345"), 4000,
                                retire_after_s=None)
    _set_rot(store, rotation.on_hello(rot2, {cmd2.id}, None, 4100), "van-2")
    engine.tick()
    done = 0
    deadline = time.monotonic() + 30
    while done < 2 and time.monotonic() < deadline:
        done += advance(store, engine.registry, logins, 5000, failing)
        engine.tick()
        time.sleep(0.02)
    assert done == 2
    assert _rot(store, "van-1").stage == "switched" and not _rot(store, "van-1").error
    assert _rot(store, "van-2").stage == "switched" and _rot(store, "van-2").id == rot2.id
    assert failing == {}
    imported = [sorted(u["password_hash"] for u in d["users"]) for d in _imports(tmp_path)]
    assert imported == [sorted(first.values()), sorted([first["van-1"], rot2.new_hash])]
    assert advance(store, engine.registry, logins, 6000, failing) == 0
    assert logins._imports._job is None


def _set_rot(store: Store, rot: Rotation, dev: str = "van-1") -> None:
    import dataclasses

    def fn(txn: Any) -> None:
        row = txn.get_device(dev)
        txn.put_device(dataclasses.replace(row, rot=rot.to_json()))
        txn.bump_registry()

    store.transact(fn)


def test_a_rotation_row_without_failure_is_the_format_older_servers_read() -> None:
    """`failed`/`error` are written only while failing (an older server reads the rest)."""
    rot = Rotation("r-1", "creds-1", 1, "h")
    assert set(rot.to_json()) == {"id", "cmd", "t", "new_hash", "retire_at", "stored",
                                  "login", "switched", "retired", "forced"}
    bad = rot.failing(5, "x" * 5000)
    assert Rotation.from_json(bad.to_json()) == bad and len(bad.error) == 600
    assert "failed" not in bad.done("switch", 6).to_json()


# ------------------------------------------------------------------------ config


def _config(tmp_path: Path, enrol: str) -> Path:
    path = tmp_path / "server.toml"
    path.write_text(f'data_dir = "{tmp_path / "server"}"\n[mqtt]\nport = 1883\n'
                    f"[enrol]\n{enrol}\n")
    return path


@pytest.mark.parametrize("enrol, says", [
    ('broker_kind = "kafka"', "broker_kind"),
    ('broker_kind = 3', "broker_kind"),
    ('broker_kind = "rabbitmq"\nrabbitmq_import = []', "rabbitmq_import"),
    ('broker_kind = "rabbitmq"\nrabbitmq_import = [""]', "rabbitmq_import"),
    ('broker_kind = "rabbitmq"\nrabbitmq_import = ["  "]', "rabbitmq_import"),
    ('broker_kind = "rabbitmq"\nrabbitmq_import = "rabbitmqctl import_definitions"',
     "rabbitmq_import"),
    ('broker_kind = "rabbitmq"\nrabbitmq_import = ["rabbitmqctl", 5]', "rabbitmq_import"),
    ('broker_kind = "rabbitmq"\nrabbitmq_import = ' + json.dumps(["x"] * 33),
     "rabbitmq_import"),
    ('broker_kind = "rabbitmq"\nbroker_reload = ["systemctl", "reload", "mosquitto"]',
     "broker_reload"),
    ('broker_kind = "rabbitmq"\nrabbitmq_delete_user = []', "rabbitmq_delete_user"),
    ('broker_kind = "rabbitmq"\nrabbitmq_delete_user = [" "]', "rabbitmq_delete_user"),
])
def test_config_refuses_what_cannot_work(tmp_path: Path, enrol: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        load_config(ServerConfig, _config(tmp_path, enrol), {})


def test_config_default_and_env_override(tmp_path: Path) -> None:
    """Default: the password file (as before); the environment can switch the kind."""
    plain = load_config(ServerConfig, _config(tmp_path, ""), {})
    assert plain.enrol.broker_kind == "embedded"
    assert plain.enrol.rabbitmq_import[:2] == ["rabbitmqctl", "import_definitions"]
    env = {"WAYSTATION_SERVER__ENROL__BROKER_KIND": "rabbitmq"}
    cfg = load_config(ServerConfig, _config(tmp_path, ""), env)
    assert cfg.enrol.broker_kind == "rabbitmq"
    logins = broker_logins(cfg.enrol, lambda: pytest.fail("no password file on RabbitMQ"))
    assert isinstance(logins, RabbitLogins)


# ------------------------------------------------------------------------ the CLI


def test_cli_on_a_rabbitmq_fleet_needs_no_password_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """device add writes the device's files and no password file; rotate-password keeps
    the new password as a RabbitMQ hash of it; the definitions command, given the server
    config, carries that hash once switched (and the enrolment password before);
    device remove says how to delete the RabbitMQ user."""
    conf = _config(tmp_path, 'broker_kind = "rabbitmq"')
    out = tmp_path / "out"
    env: dict[str, str] = {"WAYSTATION_BROKER__PASSWORD_FILE": str(tmp_path / "nope" / "pw")}
    for dev in ("van-1", "van-2"):
        assert main(["device", "add", dev, "--scope", "r1", "--systemd", "--out", str(out),
                     "--config", str(conf)], env=env) == 0
    assert "no password file written" in capsys.readouterr().out
    assert not (tmp_path / "nope").exists()
    enrolled = (out / "van-1.mqtt-password").read_text().strip()
    assert stat.S_IMODE((out / "van-1.mqtt-password").stat().st_mode) == 0o600

    assert main(["device", "rotate-password", "van-1", "--json", "--config", str(conf)],
                env=env) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["broker_kind"] == "rabbitmq" and doc["password_file"] is None
    store_cfg = load_config(ServerConfig, conf, {})
    from broker.server.store import open_store

    store = open_store(store_cfg)
    try:
        rot = _rot(store)
        assert valid_hash(rot.new_hash)
        assert rot.new_hash == hash_password(doc["password"],
                                             _salt(rot.new_hash))  # the hash of it
    finally:
        store.close()

    server_pw = tmp_path / "server-pw"
    server_pw.write_text("server-password-0123\n")
    args = ["--server-password-file", str(server_pw), "--device-passwords", str(out),
            "--server-config", str(conf)]
    assert definitions_main(args) == 0
    users = _users(capsys.readouterr().out)
    assert users["van-1"] != rot.new_hash  # not switched yet: the enrolment password
    assert users["van-1"] == hash_password(enrolled, _salt(users["van-1"]))

    store = open_store(store_cfg)
    try:
        _set_rot(store, rot.done("switch", 5000))
    finally:
        store.close()
    assert definitions_main(args) == 0
    users = _users(capsys.readouterr().out)
    assert users["van-1"] == rot.new_hash
    assert set(users) == {"waystation-server", "van-1", "van-2"}
    assert definitions_main(args[:-2]) == 0
    assert "without --server-config" in capsys.readouterr().err

    assert main(["device", "remove", "van-2", "--config", str(conf)], env=env) == 0
    assert "rabbitmqctl delete_user van-2" in capsys.readouterr().out


def test_definitions_refuse_a_server_config_that_is_not_rabbitmqs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    server_pw = tmp_path / "server-pw"
    server_pw.write_text("server-password-0123\n")
    base = ["--server-password-file", str(server_pw)]
    mosq = _config(tmp_path, f'password_file = "{tmp_path / "pw"}"')
    assert definitions_main([*base, "--server-config", str(mosq)]) == 2
    assert "broker_kind" in capsys.readouterr().err
    assert definitions_main([*base, "--server-config", str(tmp_path / "missing.toml")]) == 2
    assert "missing.toml" in capsys.readouterr().err
    broken = tmp_path / "broken.toml"
    broken.write_text("[enrol\nbroker_kind = ")
    assert definitions_main([*base, "--server-config", str(broken)]) == 2
    (tmp_path / "devs").mkdir()
    (tmp_path / "devs" / "van-1.mqtt-password").write_bytes(b"\xff\xfe\n")
    assert definitions_main([*base, "--device-passwords", str(tmp_path / "devs")]) == 2
    assert "UTF-8" in capsys.readouterr().err


def _salt(h: str) -> bytes:
    import base64

    return base64.b64decode(h)[:4]


def _users(out: str) -> dict[str, str]:
    return {u["name"]: u["password_hash"] for u in json.loads(out)["users"]}


def test_a_tick_switches_a_bounded_batch(tmp_path: Path, store_factory: StoreFactory,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Many rotations due at once: each tick imports at most MAX_SWITCHES_PER_TICK users
    (one bounded document), the rest at the next ticks."""
    import broker.server.rotation_files as rotation_files

    monkeypatch.setattr(rotation_files, "MAX_SWITCHES_PER_TICK", 2)
    devs = [f"van-{i}" for i in range(5)]
    engine, store, _ = make_engine(tmp_path, {d: ["r1"] for d in devs}, store=store_factory())
    for dev in devs:
        rot, cmd = rotation.start(store, dev, NEW, hash_password(NEW), 1000,
                                  retire_after_s=None)
        _set_rot(store, rotation.on_hello(rot, {cmd.id}, None, 1500), dev)
    engine.tick()
    logins = RabbitLogins(tuple(_recorder(tmp_path)))
    counts = []
    for now in (2000, 3000, 4000):
        counts.append(advance(store, engine.registry, logins, now))
        engine.tick()
    assert counts == [2, 2, 1]
    assert [len(d["users"]) for d in _imports(tmp_path)] == [2, 2, 1]
    assert all(_rot(store, d).stage == "switched" for d in devs)
