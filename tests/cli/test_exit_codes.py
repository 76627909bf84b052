"""Exit codes match `--help`: a store that cannot be reached, a busy port, SIGINT.
Real processes; the ports are held by real listening sockets."""

from __future__ import annotations

import errno
import signal
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli.procs import Proc, clean_env, run_cli, waystation_argv
from tests.helpers import free_port
from tests.pgserver import PgServer
from waystation.cli import main
from waystation.cli.exitcodes import (
    EXIT_CODES,
    EXIT_CODES_HELP,
    EXIT_INTERRUPTED,
    EXIT_LISTEN,
    EXIT_STORE,
    EXIT_USAGE,
)


def test_help_lists_every_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    """The epilog of `waystation --help` is the table the code uses, and nothing else
    claims to be an exit code."""
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert EXIT_CODES_HELP in out
    for code, _ in EXIT_CODES:
        assert f"\n  {code:<4} " in out
    assert [c for c, _ in EXIT_CODES] == sorted({c for c, _ in EXIT_CODES})


@pytest.fixture
def listening() -> Iterator[socket.socket]:
    """A port held by another process's listener (here: this test's socket)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    sock.setblocking(False)
    yield sock
    sock.close()


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    return errors[0]


def _accepted_nothing(sock: socket.socket) -> bool:
    try:
        conn, _ = sock.accept()
    except OSError as exc:
        assert exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK)
        return True
    conn.close()
    return False


def test_busy_metrics_port_is_named_before_the_server_connects(
        tmp_path: Path, listening: socket.socket) -> None:
    """metrics_port in use: exit 4, one line naming the port and the config key, and the
    server never opened its store nor connected to the broker (a listener of its own)."""
    busy = listening.getsockname()[1]
    fake_broker = socket.socket()
    fake_broker.bind(("127.0.0.1", 0))
    fake_broker.listen()
    fake_broker.setblocking(False)
    data = tmp_path / "server-data"
    env = clean_env({"WAYSTATION_SERVER__METRICS_PORT": str(busy),
                     "WAYSTATION_SERVER__DATA_DIR": str(data),
                     "WAYSTATION_SERVER__MQTT__PORT": str(fake_broker.getsockname()[1]),
                     "WAYSTATION_SERVER__MQTT__PASSWORD": "not-used-here"})
    try:
        result = run_cli(tmp_path, env, "server", "run")
        assert result.returncode == EXIT_LISTEN, result.stderr
        line = _one_error_line(result.stderr)
        assert f"127.0.0.1:{busy}" in line and "metrics_port" in line
        assert "WAYSTATION_SERVER__METRICS_PORT" in line and "in use" in line
        assert not (data / "store").exists()
        assert _accepted_nothing(fake_broker)
    finally:
        fake_broker.close()


@pytest.mark.parametrize("key", ["port", "tls_port"])
def test_busy_embedded_broker_port_is_one_line(
        tmp_path: Path, listening: socket.socket, key: str) -> None:
    """The embedded broker's port in use: exit 4, one line, no traceback."""
    busy = listening.getsockname()[1]
    env = clean_env({"WAYSTATION_BROKER__DATA_DIR": str(tmp_path / "broker")})
    if key == "port":
        env["WAYSTATION_BROKER__PORT"] = str(busy)
    else:
        from tests.tlsca import make_ca, make_server_cert

        ca = make_ca(tmp_path / "ca")
        cert = make_server_cert(ca, tmp_path / "srv")
        env.update(WAYSTATION_BROKER__PORT=str(free_port()),
                   WAYSTATION_BROKER__TLS_PORT=str(busy),
                   WAYSTATION_BROKER__TLS__CERT_FILE=str(cert.cert_path),
                   WAYSTATION_BROKER__TLS__KEY_FILE=str(cert.key_path))
    result = run_cli(tmp_path, env, "broker", "run")
    assert result.returncode == EXIT_LISTEN, result.stderr
    line = _one_error_line(result.stderr)
    assert f"127.0.0.1:{busy}" in line and f"{key} in the broker config" in line
    assert f"WAYSTATION_BROKER__{key.upper()}" in line


def test_unreachable_postgres_exits_3(tmp_path: Path) -> None:
    """Nothing listens where store.url points: `server run` and `server status` exit 3,
    as --help says, with one line."""
    url = f"postgresql://waystation@127.0.0.1:{free_port()}/waystation"
    env = clean_env({"WAYSTATION_SERVER__STORE__KIND": "postgres",
                     "WAYSTATION_SERVER__STORE__URL": url,
                     "WAYSTATION_SERVER__MQTT__PORT": str(free_port()),
                     "WAYSTATION_SERVER__MQTT__PASSWORD": "not-used-here"})
    for command in (["server", "run"], ["server", "status"], ["device", "list"]):
        result = run_cli(tmp_path, env, *command)
        assert result.returncode == EXIT_STORE, (command, result.stderr)
        assert "cannot connect to the PostgreSQL store" in _one_error_line(result.stderr)


def test_missing_postgres_database_exits_3(tmp_path: Path, pg_server: PgServer) -> None:
    """A real PostgreSQL server without the named database: exit 3, one line."""
    url = pg_server.create_database(f"cli_{uuid.uuid4().hex[:12]}")
    base, _, _ = url.rpartition("/")
    env = clean_env({"WAYSTATION_SERVER__STORE__KIND": "postgres",
                     "WAYSTATION_SERVER__STORE__URL": f"{base}/no_such_db_{uuid.uuid4().hex[:8]}",
                     "WAYSTATION_SERVER__MQTT__PORT": str(free_port()),
                     "WAYSTATION_SERVER__MQTT__PASSWORD": "not-used-here"})
    result = run_cli(tmp_path, env, "server", "status")
    assert result.returncode == EXIT_STORE, result.stderr
    _one_error_line(result.stderr)


@pytest.mark.parametrize("store", ["lmdb", "postgres"])
def test_sigint_stops_the_server_with_130(tmp_path: Path, store: str,
                                          request: pytest.FixtureRequest) -> None:
    """Ctrl-C on `server run` (connected to an embedded broker): a clean stop, exit 130;
    SIGTERM (systemctl stop) is exit 0, tested in test_single_machine."""
    port = free_port()
    env = clean_env({"WAYSTATION_BROKER__PORT": str(port),
                     "WAYSTATION_SERVER__MQTT__PORT": str(port),
                     "WAYSTATION_BROKER__DATA_DIR": str(tmp_path / "broker"),
                     "WAYSTATION_SERVER__DATA_DIR": str(tmp_path / "server")})
    if store == "postgres":
        pg: PgServer = request.getfixturevalue("pg_server")
        env.update(WAYSTATION_SERVER__STORE__KIND="postgres",
                   WAYSTATION_SERVER__STORE__URL=pg.create_database(
                       f"cli_{uuid.uuid4().hex[:12]}"))
    broker = Proc(tmp_path, env, "broker", "broker", "run")
    server: Proc | None = None
    try:
        broker.wait_log("embedded broker ready")
        server = Proc(tmp_path, env, "server", "server", "run")
        server.wait_log("server_connected")
        server.popen.send_signal(signal.SIGINT)
        assert server.wait_exit() == EXIT_INTERRUPTED
    finally:
        if server is not None:
            server.close()
        broker.close()


def test_bad_subcommand_argument_prints_that_subcommands_usage(tmp_path: Path) -> None:
    """An unknown option after a subcommand: its usage (not the top-level one), exit 2."""
    for argv, usage in ((["device", "list", "--bogus"], "usage: waystation device list"),
                        (["agent", "put", "c", "k", "a=1", "--nope"],
                         "usage: waystation agent put"),
                        (["server", "deadletters", "--limit", "0"],
                         "usage: waystation server deadletters"),
                        (["server", "conflicts", "--limit", "x"],
                         "usage: waystation server conflicts")):
        result = subprocess.run(waystation_argv(*argv), capture_output=True, text=True,
                                timeout=60, cwd=tmp_path, env=clean_env(), check=False)
        assert result.returncode == EXIT_USAGE, argv
        assert result.stderr.startswith(usage), result.stderr
        assert "usage: waystation [-h]" not in result.stderr


def test_an_unforeseen_port_in_use_is_exit_4(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """A bind failure no start-up check covered (a real one, from a taken port) still
    ends as one line and exit 4."""
    (tmp_path / "ws_cli_bind.py").write_text(
        "import socket\n"
        "def binds(args, env):\n"
        "    with socket.socket() as s:\n"
        "        s.bind(('127.0.0.1', int(env['PORT'])))\n"
        "    return 0\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code = main(["server", "status"], env={"PORT": str(taken.getsockname()[1])},
                    handlers={"server status": "ws_cli_bind:binds"})
    assert code == EXIT_LISTEN
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "port" in err and "Traceback" not in err
