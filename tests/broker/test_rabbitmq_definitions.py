"""broker.rabbitmq.definitions: the ACL as RabbitMQ definitions (pure), and its command."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.rabbitmq.definitions import (
    definitions,
    device_entries,
    hash_password,
    main,
    server_entries,
)

DEVICE = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True)


@given(st.text(min_size=1, max_size=40), st.binary(min_size=4, max_size=4))
def test_password_hash_is_rabbitmq_sha256(password: str, salt: bytes) -> None:
    """base64(salt + sha256(salt + utf8 password)), the salt kept in front."""
    raw = base64.b64decode(hash_password(password, salt))
    assert raw[:4] == salt
    assert raw[4:] == hashlib.sha256(salt + password.encode()).digest()


@given(DEVICE, DEVICE)
def test_device_topic_permissions_match_only_its_own_topics(dev: str, other: str) -> None:
    """Write: own up/status only; read: own down only (routing keys, '.' in ids as '/')."""
    perms = device_entries("waystation", dev, "pw")["topic_permission"]
    key = dev.replace(".", "/")
    write, read = re.compile(perms["write"]), re.compile(perms["read"])
    assert write.search(f"waystation.{key}.up") and write.search(f"waystation.{key}.status")
    assert not write.search(f"waystation.{key}.down") and read.search(f"waystation.{key}.down")
    assert not read.search(f"waystation.{key}.up") and not read.search("waystation.#")
    if other != dev:
        okey = other.replace(".", "/")
        for topic in ("up", "status", "down"):
            assert not write.search(f"waystation.{okey}.{topic}")
            assert not read.search(f"waystation.{okey}.{topic}")


@given(DEVICE)
def test_server_announcements_read_by_devices_written_by_servers(dev: str) -> None:
    """Devices read `_server.{group}.{server}.state` (also as a `*` subscription), never
    write it; the server user writes it (PROTOCOL.md §7.12)."""
    perms = device_entries("waystation", dev, "pw")["topic_permission"]
    key = dev.replace(".", "/")
    write, read = re.compile(perms["write"]), re.compile(perms["read"])
    for topic in ("waystation._server.main.server-1.state", "waystation._server.main.*.state"):
        assert read.search(topic) and not write.search(topic)
    assert not read.search("waystation._server.#")
    assert not write.search(f"waystation._server.main.{key}.state")
    server = re.compile(server_entries("waystation", "srv", "pw")["topic_permission"]["write"])
    assert server.search("waystation._server.main.server-1.state")
    assert server.search(f"waystation.{key}.down") and not server.search(f"waystation.{key}.up")


def test_definitions_hold_every_user_and_the_up_queue() -> None:
    """One user, permission and topic permission per login; the quorum up queue, bound."""
    doc = definitions(prefix="ws", server_users={"srv": "a"}, devices={"v1": "b", "v2": "c"})
    assert [u["name"] for u in doc["users"]] == ["srv", "v1", "v2"]
    assert all("password" not in u for u in doc["users"])
    assert len(doc["permissions"]) == len(doc["topic_permissions"]) == 3
    assert doc["queues"][0]["name"] == "ws.up"
    assert doc["queues"][0]["arguments"] == {"x-queue-type": "quorum"}
    assert doc["bindings"][0]["routing_key"] == "ws.*.up"


def test_command_reads_password_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                      ) -> None:
    """The command makes one device per *.mqtt-password file."""
    (tmp_path / "van-1.mqtt-password").write_text("pw1\n")
    (tmp_path / "server").write_text("spw\n")
    assert main(["--server-password-file", str(tmp_path / "server"),
                 "--device-passwords", str(tmp_path)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [u["name"] for u in doc["users"]] == ["waystation-server", "van-1"]


@pytest.mark.parametrize("content", [None, ""])
def test_command_refuses_missing_or_empty_files(tmp_path: Path, content: str | None,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A missing or empty password file: exit 2 with a one-line error, no output."""
    path = tmp_path / "server"
    if content is not None:
        path.write_text(content)
    assert main(["--server-password-file", str(path)]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith("error:")
