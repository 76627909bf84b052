"""The broker side of a password rotation (`broker.server.rotation_files`) against real
brokers: through begin, switch and retire a device can always log in with the password
it holds (embedded amqtt: old and new through the overlap file; Mosquitto: the old until
the switch's reload, the new from then on); afterwards only the new one works; a device
removed mid-rotation is locked out with both."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from broker.cli.logins import revoke_credentials
from broker.embedded.passwords import (
    add_overlap,
    drop_overlap,
    hash_password,
    overlap_path,
    read_overlap,
    read_password_file,
    write_password_entry,
)
from broker.server.rotation_files import RotationFiles
from tests.fixtures_brokers import BrokerProcess
from tests.helpers import RecordingClient, wait_until

OLD = "old-password-0123456789"
NEW = "new-password-ABCDEFGHIJ"
DEV = "van-31"



def login(made: list[RecordingClient], broker: BrokerProcess, password: str) -> str:
    client = RecordingClient(broker.port, DEV, DEV, password)
    made.append(client)
    return client.connect()


def files_for(broker: BrokerProcess) -> RotationFiles:
    reload: tuple[str, ...] = ()
    if broker.name == "mosquitto":
        assert broker.proc is not None
        reload = ("kill", "-HUP", str(broker.proc.pid))
    return RotationFiles(broker.password_file, reload)


def test_both_passwords_work_through_the_rotation_then_only_the_new(
        any_broker: BrokerProcess, clients: list[RecordingClient]) -> None:
    """Every step keeps the password the device may hold usable; retire ends the old."""
    broker = any_broker
    mosquitto = broker.name == "mosquitto"
    write_password_entry(broker.password_file, DEV, OLD)
    files = files_for(broker)
    files.reload_broker()
    wait_until(lambda: login(clients, broker, OLD) == "Success", 15, message="old login")

    new_hash = hash_password(NEW)
    files.begin(DEV, new_hash)
    assert login(clients, broker, OLD) == "Success"
    # The embedded broker takes the new one at once; Mosquitto only after the switch.
    assert login(clients, broker, NEW) == ("Not authorized" if mosquitto else "Success")

    holder = RecordingClient(broker.port, DEV, DEV, OLD)  # connected with the old one
    clients.append(holder)
    assert holder.connect() == "Success"
    files.switch(DEV, new_hash)
    if mosquitto:
        # Mosquitto's reload drops a client whose password no longer matches (checked
        # before any other login with this client id could take its session over): the
        # agent reconnects, new password first (it stored it before the switch).
        wait_until(lambda: holder.state.disconnects, 15, message="old session dropped")
    wait_until(lambda: login(clients, broker, NEW) == "Success", 15, message="new login")
    assert read_password_file(broker.password_file)[DEV] == new_hash
    if not mosquitto:
        assert login(clients, broker, OLD) == "Success"  # overlap: the old one too

    files.retire(DEV)
    assert DEV not in read_overlap(overlap_path(broker.password_file))
    assert login(clients, broker, NEW) == "Success"
    assert login(clients, broker, OLD) != "Success"


def test_a_device_removed_during_a_rotation_is_locked_out(
        embedded_broker: BrokerProcess, clients: list[RecordingClient]) -> None:
    """`device remove` drops the overlap entries too: neither password works."""
    write_password_entry(embedded_broker.password_file, DEV, OLD)
    RotationFiles(embedded_broker.password_file).begin(DEV, hash_password(NEW))
    assert login(clients, embedded_broker, NEW) == "Success"
    revoke_credentials({}, DEV, embedded_broker.password_file)
    assert login(clients, embedded_broker, OLD) == "Not authorized"
    assert login(clients, embedded_broker, NEW) == "Not authorized"


def test_switch_repeated_after_a_crash_keeps_the_old_password(tmp_path: Path) -> None:
    """switch() is idempotent: run twice (a crash before it was recorded), the old hash
    stays in the overlap file and the new one in the password file."""
    pw = tmp_path / "passwd"
    write_password_entry(pw, DEV, OLD)
    old_hash = read_password_file(pw)[DEV]
    new_hash = hash_password(NEW)
    files = RotationFiles(pw)
    files.begin(DEV, new_hash)
    files.switch(DEV, new_hash)
    files.switch(DEV, new_hash)
    assert read_password_file(pw)[DEV] == new_hash
    assert read_overlap(overlap_path(pw))[DEV] == [new_hash, old_hash]


def test_overlap_entries_are_added_once_and_dropped_per_user(tmp_path: Path) -> None:
    """add_overlap is idempotent and keeps other users; drop_overlap says whether it did."""
    pw = tmp_path / "passwd"
    add_overlap(pw, DEV, "$7$1$a$b")
    add_overlap(pw, DEV, "$7$1$a$b")
    add_overlap(pw, "van-32", "$7$1$c$d")
    assert read_overlap(overlap_path(pw)) == {DEV: ["$7$1$a$b"], "van-32": ["$7$1$c$d"]}
    assert os.stat(overlap_path(pw)).st_mode & 0o777 == 0o600
    assert drop_overlap(pw, DEV) is True
    assert drop_overlap(pw, DEV) is False
    assert read_overlap(overlap_path(pw)) == {"van-32": ["$7$1$c$d"]}
    with pytest.raises(ValueError):
        add_overlap(pw, "bad:user", "$7$1$a$b")


def test_a_failing_reload_command_is_reported_not_raised(tmp_path: Path) -> None:
    """A reload command that fails or does not exist leaves the files switched."""
    pw = tmp_path / "passwd"
    write_password_entry(pw, DEV, OLD)
    new_hash = hash_password(NEW)
    RotationFiles(pw, ("false",)).switch(DEV, new_hash)
    RotationFiles(pw, ("/nonexistent/reload",)).switch(DEV, new_hash)
    assert read_password_file(pw)[DEV] == new_hash
    marker = tmp_path / "reloaded"
    RotationFiles(pw, ("touch", str(marker))).switch(DEV, new_hash)
    assert marker.exists()
