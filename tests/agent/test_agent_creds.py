"""The device's broker passwords during a rotation (`agent.creds`, PROTOCOL.md §7.9
`creds`): a `creds` command is checked (hostile payloads refused), the new password is
on disk (0600, atomic) before it counts, logins try the new one first and fall back to
the old one, the old one is forgotten only after a login with the new, a replayed older
rotation is refused, and an operator's edit of the configured password wins."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.creds import FILE_NAME, BadCreds, BrokerCredentials, Secret, parse

DEV = "van-1"
OLD = "old-password-0123456789"
NEW = "new-password-ABCDEFGHIJ"


def args(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"dev": DEV, "rotation": "r-1", "t": 1000, "password": NEW}
    base.update(over)
    return {k: v for k, v in base.items() if v is not ...}


def test_a_well_formed_command_gives_its_secret() -> None:
    """parse() returns rotation, time and password of a valid `creds` command."""
    assert parse(args(), DEV) == Secret("r-1", 1000, NEW)


@pytest.mark.parametrize("bad", [
    None, [], "x", 5,
    args(dev="van-2"),                      # a password for another device
    args(dev=...), args(rotation=...), args(t=...), args(password=...),
    args(rotation="bad id!"), args(rotation=""), args(rotation=7), args(rotation="r" * 65),
    args(t=True), args(t=1.5), args(t=0), args(t=-1), args(t=2**53), args(t="1000"),
    args(password="short"), args(password="x" * 257), args(password="has space 12345678"),
    args(password="line\nbreak-123456789"), args(password="ümlaut-passwort-1234"),
    args(password=None), args(password=["a" * 20]),
])
def test_malformed_or_foreign_commands_are_refused(bad: Any) -> None:
    """Every malformed member, and a password meant for another device, is BadCreds."""
    with pytest.raises(BadCreds):
        parse(bad, DEV)


# Plausible values mixed with junk, so that both outcomes occur.
json_values = (st.sampled_from([DEV, "van-2", "r-1", 1000, NEW, "", True])
               | st.none() | st.integers() | st.floats(allow_nan=False)
               | st.text(max_size=40) | st.lists(st.integers(), max_size=3))


@given(st.dictionaries(st.sampled_from(["dev", "rotation", "t", "password", "x"]),
                       json_values, max_size=5))
def test_any_payload_is_accepted_or_refused_never_crashes(payload: dict[str, Any]) -> None:
    """Arbitrary JSON args give a Secret or BadCreds, nothing else."""
    try:
        secret = parse(payload, DEV)
    except BadCreds:
        return
    assert payload["dev"] == DEV and secret.password == payload["password"]


def test_the_new_password_is_stored_privately_before_offer_returns(tmp_path: Path) -> None:
    """offer() writes the file (mode 0600, no temp files left) and a new process reads it."""
    creds = BrokerCredentials(tmp_path, OLD)
    assert creds.offer(Secret("r-1", 1000, NEW)) is True
    path = tmp_path / FILE_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [FILE_NAME]
    doc = json.loads(path.read_text())
    assert [s["pw"] for s in doc["pending"]] == [NEW] and doc["current"] is None
    again = BrokerCredentials(tmp_path, OLD)  # as after a crash and restart
    assert again.pending_rotation == "r-1"
    assert again.password() == NEW


def test_login_tries_new_first_and_falls_back_to_old(tmp_path: Path) -> None:
    """A refused new password (Mosquitto before the switch) falls back to the old one;
    the next connection tries the new one again."""
    creds = BrokerCredentials(tmp_path, OLD)
    creds.offer(Secret("r-1", 1000, NEW))
    assert creds.password() == NEW
    creds.refused()
    assert creds.password() == OLD
    creds.accepted()
    assert creds.login_rotation is None  # logged in with the configured password
    assert creds.pending_rotation == "r-1"
    assert creds.password() == NEW


def test_the_old_password_is_forgotten_only_after_a_login_with_the_new(
        tmp_path: Path) -> None:
    """After the broker accepted the new password it is the current one, on disk too;
    the configured (old) one is tried last only."""
    creds = BrokerCredentials(tmp_path, OLD)
    creds.offer(Secret("r-1", 1000, NEW))
    assert creds.password() == NEW
    creds.accepted()
    assert creds.login_rotation == "r-1" and creds.pending_rotation is None
    doc = json.loads((tmp_path / FILE_NAME).read_text())
    assert doc["current"]["pw"] == NEW and doc["pending"] == []
    reopened = BrokerCredentials(tmp_path, OLD)
    assert reopened.password() == NEW
    reopened.refused()
    assert reopened.password() == OLD  # a fallback, should the operator roll back


def test_a_crash_before_the_save_leaves_the_old_password(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """offer() failing while writing leaves no file and no pending rotation: the device
    keeps logging in with the old password (and does not report the command done)."""
    creds = BrokerCredentials(tmp_path, OLD)

    def crash(fd: int) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError):
        creds.offer(Secret("r-1", 1000, NEW))
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []
    # Not used either: a password that is not on disk could be lost with the old one.
    assert creds.pending_rotation is None and creds.password() == OLD
    reopened = BrokerCredentials(tmp_path, OLD)
    assert reopened.pending_rotation is None and reopened.password() == OLD


def test_a_replayed_older_rotation_is_refused_and_a_resent_one_accepted(
        tmp_path: Path) -> None:
    """A rotation not newer than the one held is a replay (BadCreds, nothing changes);
    the same rotation sent again (a lost report) is fine."""
    creds = BrokerCredentials(tmp_path, OLD)
    creds.offer(Secret("r-2", 2000, NEW))
    assert creds.offer(Secret("r-2", 2000, NEW)) is True
    with pytest.raises(BadCreds):
        creds.offer(Secret("r-1", 1000, "replayed-password-0000"))
    with pytest.raises(BadCreds):
        creds.offer(Secret("r-3", 2000, "same-time-password-000"))
    assert creds.pending_rotation == "r-2" and creds.password() == NEW
    creds.accepted()
    with pytest.raises(BadCreds):  # also once the held one is current
        creds.offer(Secret("r-1", 1000, "replayed-password-0000"))
    creds.offer(Secret("r-4", 3000, "newer-password-1111111"))
    assert creds.password() == "newer-password-1111111"


def test_an_edited_configured_password_wins_over_stored_ones(tmp_path: Path) -> None:
    """The operator rotated by hand (config edited after a rotation): the configured
    password is tried first, the stored ones after it."""
    creds = BrokerCredentials(tmp_path, OLD)
    creds.offer(Secret("r-1", 1000, NEW))
    creds.password()
    creds.accepted()
    edited = BrokerCredentials(tmp_path, "hand-written-password-42")
    assert edited.password() == "hand-written-password-42"
    edited.refused()
    assert edited.password() == NEW


@pytest.mark.parametrize("content", [b"{not json", b"[]", b'{"v": 99}', b"x" * 10000])
def test_a_damaged_file_falls_back_to_the_configured_password(tmp_path: Path,
                                                               content: bytes) -> None:
    """A damaged or foreign credentials file is reported and ignored, never a crash."""
    (tmp_path / FILE_NAME).write_bytes(content)
    creds = BrokerCredentials(tmp_path, OLD)
    assert creds.password() == OLD and creds.pending_rotation is None


def test_a_superseded_password_still_logs_in_and_keeps_the_newer_one(tmp_path: Path) -> None:
    """Two rotations received before any login: both are kept (the broker may have been
    switched to the first); a login with the first keeps the second pending, a login
    with the second forgets everything older."""
    creds = BrokerCredentials(tmp_path, OLD)
    creds.offer(Secret("r-1", 1000, "first-password-0123456"))
    creds.offer(Secret("r-2", 2000, "second-password-012345"))
    tried = []
    for _ in range(3):
        tried.append(creds.password())
        creds.refused()
    assert tried == ["second-password-012345", "first-password-0123456", OLD]
    assert creds.password() == "second-password-012345"  # round again, newest first
    creds.refused()  # the broker still has the first
    assert creds.password() == "first-password-0123456"
    creds.accepted()
    assert creds.login_rotation == "r-1" and creds.pending_rotation == "r-2"
    reopened = BrokerCredentials(tmp_path, OLD)
    assert reopened.password() == "second-password-012345"
    reopened.accepted()
    doc = json.loads((tmp_path / FILE_NAME).read_text())
    assert doc["current"]["id"] == "r-2" and doc["pending"] == []
    seen = set()
    for _ in range(4):  # the first password is gone; the configured one stays last
        seen.add(reopened.password())
        reopened.refused()
    assert seen == {"second-password-012345", OLD}


def test_at_most_a_few_received_passwords_are_kept(tmp_path: Path) -> None:
    """An unbounded number of rotations never used for a login keeps the newest few."""
    creds = BrokerCredentials(tmp_path, OLD)
    for i in range(1, 10):
        creds.offer(Secret(f"r-{i}", i * 1000, f"password-number-{i:06d}"))
    doc = json.loads((tmp_path / FILE_NAME).read_text())
    assert [s["id"] for s in doc["pending"]] == ["r-9", "r-8", "r-7", "r-6"]


@given(st.lists(st.tuples(st.sampled_from(["offer", "login", "restart"]),
                          st.integers(min_value=0, max_value=5)), max_size=15))
def test_a_password_the_broker_takes_is_found_within_one_round(
        steps: list[tuple[str, int]]) -> None:
    """No lockout: whatever rotations arrived, logins and restarts happened, if the
    broker accepts the configured password or any received one that no later login
    superseded, the device logs in within one round of its candidates."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        creds = BrokerCredentials(data, OLD)
        offered: list[str] = []
        t = 0
        for action, pick in steps:
            if action == "offer":
                t += 1000
                pw = f"rotated-password-{t:08d}"
                creds.offer(Secret(f"r-{t}", t, pw))
                offered.append(pw)
            elif action == "restart":
                creds = BrokerCredentials(data, OLD)
            else:
                # The broker takes exactly one of the passwords that may be live.
                live = [OLD, *offered[-4:]]
                accepted = live[pick % len(live)]
                for _ in range(6):
                    if creds.password() == accepted:
                        creds.accepted()
                        break
                    creds.refused()
                else:
                    raise AssertionError(f"locked out: broker takes {accepted!r}")
                if accepted != OLD:
                    # Older rotations are superseded by this login; the broker will not
                    # go back to them (the server only moves forward).
                    offered = offered[offered.index(accepted):]
