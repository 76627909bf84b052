"""A broker password rotation on the server (`broker.server.rotation`, PROTOCOL.md §7.9
`creds`, §7.1 `cred`): the stages only move forward, the old password is never retired
before the device logged in with the new one or the deadline passed, a v1 device is
never sent the command, a hello naming another (replayed, older) rotation changes
nothing, and the password leaves the store once the device has it. Both backends."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.errors import InvalidArgument, UnknownDevice
from broker.server import rotation
from broker.server.engine import Engine
from broker.server.rotation import Rotation, on_hello
from broker.server.store.base import Store
from tests.server.conftest import StoreFactory
from tests.server.helpers import by_device, errors, make_engine, of_type

DEVICES = {"van-1": ["r1"]}
HASH = "$7$101$c2FsdA==$aGFzaA=="


@pytest.fixture
def env(tmp_path: Path, store_factory: StoreFactory) -> Iterator[tuple[Engine, Store]]:
    engine, store, _ = make_engine(tmp_path, DEVICES, store=store_factory())
    yield engine, store


def hello(caps: Any = None, **extra: Any) -> bytes:
    msg: dict[str, Any] = {"type": "hello", "v": 1, "dev": "van-1", "agent": "t/1", "sv": 1,
                           **extra}
    if caps is not None:
        msg["caps"] = caps
    return orjson.dumps(msg)


def _rot(store: Store) -> Rotation:
    with store.read() as txn:
        row = txn.get_device("van-1")
    assert row is not None
    rot = Rotation.from_json(row.rot)
    assert rot is not None
    return rot


def _creds_args(store: Store) -> dict[str, Any]:
    with store.read() as txn:
        return next(c.args for c in txn.commands("van-1") if c.cmd == "creds")


def test_the_command_reaches_only_a_device_that_speaks_creds(env: tuple[Engine, Store]
                                                              ) -> None:
    """A v1 hello (no caps) gets no `creds` command; one offering `creds` gets it with the
    password for its own id."""
    engine, store = env
    rot, cmd = rotation.start(store, "van-1", "new-password-ABCDEFGHIJ", HASH, 1000,
                              retire_after_s=None)
    engine.tick()
    v1 = by_device(engine.handle_up("van-1", hello()))
    assert of_type(v1.get("van-1", []), "command") == []
    out = by_device(engine.handle_up("van-1", hello(["creds"])))
    [sent] = of_type(out["van-1"], "command")
    assert sent["cmd"] == "creds" and sent["id"] == cmd.id
    assert sent["args"] == {"dev": "van-1", "rotation": rot.id, "t": 1000,
                            "password": "new-password-ABCDEFGHIJ"}
    assert _rot(store).stage == "sent"


def test_done_then_login_moves_the_rotation_and_drops_the_password(
        env: tuple[Engine, Store]) -> None:
    """Reported done: stored (and the password gone from the store); a hello whose
    `cred` names the rotation: logged in with the new one."""
    engine, store = env
    rot, cmd = rotation.start(store, "van-1", "new-password-ABCDEFGHIJ", HASH, 1000,
                              retire_after_s=None)
    engine.handle_up("van-1", hello(["creds"], done=[cmd.id]))
    assert _rot(store).stage == "stored" and _rot(store).due(10**13) == "switch"
    assert "password" not in _creds_args(store)
    assert _rot(store).login == 0
    engine.handle_up("van-1", hello(["creds"], done=[cmd.id], cred=rot.id))
    assert _rot(store).login > 0


def test_a_hello_naming_another_rotation_changes_nothing(env: tuple[Engine, Store]) -> None:
    """A replayed or forged `cred` of an older rotation does not count as a login with
    the new password; a malformed `cred` is refused as invalid."""
    engine, store = env
    first, _ = rotation.start(store, "van-1", "first-password-0123456", HASH, 1000,
                              retire_after_s=None)
    second, _ = rotation.start(store, "van-1", "second-password-012345", HASH, 2000,
                               retire_after_s=None)
    # The first rotation's command was superseded: done, its password dropped.
    with store.read() as txn:
        cmds = {c.args["rotation"]: c for c in txn.commands("van-1") if c.cmd == "creds"}
    assert cmds[first.id].done_ms and "password" not in cmds[first.id].args
    engine.handle_up("van-1", hello(["creds"], cred=first.id))
    assert _rot(store).id == second.id and _rot(store).login == 0
    out = by_device(engine.handle_up("van-1", hello(["creds"], cred="bad id!")))
    assert [e["code"] for e in errors(out["van-1"])] == ["invalid"]
    assert _rot(store).login == 0


def test_bad_rotation_requests_are_refused(env: tuple[Engine, Store]) -> None:
    """Unknown device, or a deadline out of range."""
    _, store = env
    with pytest.raises(UnknownDevice):
        rotation.start(store, "nobody", "new-password-ABCDEFGHIJ", HASH, 1, retire_after_s=None)
    with pytest.raises(InvalidArgument):
        rotation.start(store, "van-1", "new-password-ABCDEFGHIJ", HASH, 1, retire_after_s=-1)
    with pytest.raises(InvalidArgument):
        rotation.start(store, "van-1", "new-password-ABCDEFGHIJ", HASH, 1,
                       retire_after_s=rotation.MAX_RETIRE_AFTER_S + 1)


events = st.lists(st.sampled_from(["done", "login", "other", "tick", "late"]), max_size=12)


@given(events, st.booleans())
def test_stages_move_forward_and_retire_needs_a_login_or_the_deadline(
        seq: list[str], deadline: bool) -> None:
    """Whatever the order of hellos and ticks: the stage never goes back, nothing is
    switched before the device stored the password (or logged in, or the deadline), and
    the old password is retired only after a login with the new one or the deadline."""
    order = ["sent", "stored", "switched", "retired"]
    rot = Rotation("r-2", "creds-2", 1000, HASH, retire_at=5000 if deadline else 0)
    now = 1000
    for event in seq:
        now += 100
        before = rot
        if event in ("done", "login", "other"):
            rot = on_hello(rot, {"creds-2"} if event == "done" else set(),
                           {"login": "r-2", "other": "r-1"}.get(event), now)
        else:
            at = 6000 if event == "late" else now
            step = rot.due(at)
            if step == "switch":
                assert rot.stored or rot.login or (deadline and at >= 5000)
            if step == "retire":
                assert rot.switched and (rot.login or (deadline and at >= 5000))
            if step is not None:
                rot = rot.done(step, at)
        assert order.index(rot.stage) >= order.index(before.stage)
        if rot.retired and not rot.login:
            assert deadline and rot.forced
