"""Mosquitto-compatible password files: format, verification, atomic writes, and both
directions of compatibility with the real mosquitto_passwd and mosquitto."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from broker.embedded.passwords import (
    delete_password_entry,
    hash_password,
    read_password_file,
    verify_password,
    write_password_entry,
)
from tests.fixtures_brokers import USERS, BrokerProcess
from tests.helpers import RecordingClient, wait_until
from waystation.errors import ConfigError

MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd")
needs_mosquitto_passwd = pytest.mark.skipif(
    MOSQUITTO_PASSWD is None, reason="mosquitto_passwd is not installed (apt-get install mosquitto)"
)


def mosquitto_passwd(path: Path, user: str, password: str, *extra: str) -> None:
    assert MOSQUITTO_PASSWD is not None
    create = [] if path.exists() else ["-c"]
    subprocess.run([MOSQUITTO_PASSWD, *extra, *create, "-b", str(path), user, password],
                   check=True, capture_output=True)


def test_hash_has_mosquitto_2_format() -> None:
    """$7$101$<16 b64 chars = 12-byte salt>$<88 b64 chars = 64-byte key>, like mosquitto_passwd."""
    stored = hash_password("secret")
    assert re.fullmatch(r"\$7\$101\$[A-Za-z0-9+/]{16}\$[A-Za-z0-9+/]{86}==", stored)


def test_hash_uses_a_fresh_salt_each_time() -> None:
    """Two hashes of one password differ; both verify."""
    a, b = hash_password("secret"), hash_password("secret")
    assert a != b
    assert verify_password(a, "secret") and verify_password(b, "secret")


def test_verify_accepts_right_and_refuses_wrong_password() -> None:
    """Only the exact password matches (including the empty one when that was hashed)."""
    stored = hash_password("s3cret-ü")
    assert verify_password(stored, "s3cret-ü")
    assert not verify_password(stored, "s3cret-u")
    assert not verify_password(stored, "")
    assert verify_password(hash_password(""), "")


def test_iterations_are_read_from_the_hash() -> None:
    """A hash written with more iterations verifies (the count travels in the string)."""
    stored = hash_password("pw", iterations=5000)
    assert stored.startswith("$7$5000$")
    assert verify_password(stored, "pw")


@pytest.mark.parametrize("stored", [
    "", "plain", "$7$", "$7$101$", "$7$abc$AAAA$AAAA", "$7$101$not base64!$AAAA",
    "$7$0$AAAA$AAAA", "$7$999999999$AAAA$AAAA", "$7$101$AAAA$", "$6$AAAA", "$6$!!$AAAA",
    "$5$AAAA$AAAA", "$argon2id$v=19$m=65536,t=3,p=4$abc$def",
])
def test_malformed_hashes_match_nothing_and_never_raise(stored: str) -> None:
    """A damaged line in the file locks that user out; it does not crash the broker."""
    assert verify_password(stored, "") is False
    assert verify_password(stored, "pw") is False


@needs_mosquitto_passwd
def test_hashes_made_by_mosquitto_passwd_verify(tmp_path: Path) -> None:
    """Files written by mosquitto_passwd 2.0 ($7$ default and -H sha512 $6$) are read right."""
    path = tmp_path / "passwd"
    mosquitto_passwd(path, "van-1", "pbkdf2-pw")
    mosquitto_passwd(path, "van-2", "legacy-pw", "-H", "sha512")
    users = read_password_file(path)
    assert users["van-1"].startswith("$7$101$")
    assert users["van-2"].startswith("$6$")
    assert verify_password(users["van-1"], "pbkdf2-pw")
    assert not verify_password(users["van-1"], "legacy-pw")
    assert verify_password(users["van-2"], "legacy-pw")
    assert not verify_password(users["van-2"], "pbkdf2-pw")


def test_write_creates_a_private_file_and_replaces_in_place(tmp_path: Path) -> None:
    """Mode 0600; updating a user keeps the others and their order; no temp file remains."""
    path = tmp_path / "sub" / "passwd"
    write_password_entry(path, "van-1", "a")
    write_password_entry(path, "van-2", "b")
    write_password_entry(path, "van-1", "c")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    users = read_password_file(path)
    assert list(users) == ["van-1", "van-2"]
    assert verify_password(users["van-1"], "c") and verify_password(users["van-2"], "b")
    assert sorted(p.name for p in path.parent.iterdir()) == ["passwd"]


def test_write_replaces_the_file_atomically(tmp_path: Path) -> None:
    """The file is swapped by rename: a reader holding the old inode sees the old content."""
    path = tmp_path / "passwd"
    write_password_entry(path, "van-1", "a")
    before = path.stat().st_ino
    with path.open() as old:
        write_password_entry(path, "van-2", "b")
        assert old.read().count("\n") == 1
    assert path.stat().st_ino != before


def test_write_keeps_comments_and_foreign_lines(tmp_path: Path) -> None:
    """Lines we did not write (comments, other users) survive an update."""
    path = tmp_path / "passwd"
    path.write_text("# fleet\nops:" + hash_password("x") + "\n")
    write_password_entry(path, "van-1", "a")
    text = path.read_text()
    assert text.startswith("# fleet\nops:$7$")
    assert set(read_password_file(path)) == {"ops", "van-1"}


def test_delete_removes_only_that_user(tmp_path: Path) -> None:
    """delete_password_entry drops one user and reports whether it was there."""
    path = tmp_path / "passwd"
    write_password_entry(path, "van-1", "a")
    write_password_entry(path, "van-2", "b")
    assert delete_password_entry(path, "van-1") is True
    assert delete_password_entry(path, "van-1") is False
    assert list(read_password_file(path)) == ["van-2"]
    assert delete_password_entry(tmp_path / "missing", "van-1") is False


@pytest.mark.parametrize("user", ["", "a:b", "a\nb", " van", "van "])
def test_write_refuses_usernames_that_break_the_format(tmp_path: Path, user: str) -> None:
    """A username with ':' or a line break (or padding) would corrupt the file."""
    with pytest.raises(ValueError):
        write_password_entry(tmp_path / "passwd", user, "pw")


def test_read_skips_blanks_and_comments_and_rejects_garbage(tmp_path: Path) -> None:
    """Comments and blank lines are ignored; a line without ':' is a ConfigError naming it."""
    path = tmp_path / "passwd"
    path.write_text("\n# c\n  \nvan-1:$7$x\n")
    assert read_password_file(path) == {"van-1": "$7$x"}
    path.write_text("van-1:$7$x\ngarbage\n")
    with pytest.raises(ConfigError, match="line 2"):
        read_password_file(path)


def test_mosquitto_accepts_a_file_we_wrote(mosquitto_broker: BrokerProcess) -> None:
    """Real Mosquitto authenticates against our password file: right password in, wrong out."""
    ok = RecordingClient(mosquitto_broker.port, "van-12", "van-12", USERS["van-12"])
    bad = RecordingClient(mosquitto_broker.port, "van-7", "van-7", "not-it")
    try:
        assert ok.connect() == "Success"
        assert bad.connect() == "Not authorized"
    finally:
        ok.close()
        bad.close()


@needs_mosquitto_passwd
def test_embedded_broker_accepts_mosquitto_passwd_entry_without_restart(
    embedded_broker: BrokerProcess,
) -> None:
    """A user added to the live file by mosquitto_passwd can log in at once (file re-read)."""
    refused = RecordingClient(embedded_broker.port, "van-99", "van-99", "pw-99")
    try:
        assert refused.connect() == "Not authorized"
    finally:
        refused.close()
    mosquitto_passwd(embedded_broker.password_file, "van-99", "pw-99")

    def logs_in() -> bool:
        client = RecordingClient(embedded_broker.port, "van-99", "van-99", "pw-99")
        try:
            return client.connect() == "Success"
        finally:
            client.close()

    # mtime granularity: a rewrite within the same tick as the first read is caught by
    # the size/inode part of the check, so this normally succeeds on the first try
    wait_until(logs_in, 10, interval=0.05, message="van-99 accepted after enrolment")


def test_rewrite_keeps_mode_and_group_of_the_existing_file(tmp_path: Path) -> None:
    """Enrolling a device keeps the password file readable by the broker's group: a
    rewrite preserves the existing file's mode and group instead of resetting to 0600."""
    import grp

    path = tmp_path / "passwd"
    write_password_entry(path, "waystation-server", "secret-1")
    group = next((g for g in grp.getgrall() if g.gr_gid != os.getgid()), None)
    if group is not None:
        os.chown(path, -1, group.gr_gid)
    os.chmod(path, 0o640)
    write_password_entry(path, "van-1", "secret-2")
    st = path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o640
    if group is not None:
        assert st.st_gid == group.gr_gid
    assert set(read_password_file(path)) == {"waystation-server", "van-1"}
