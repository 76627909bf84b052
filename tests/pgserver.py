"""A private PostgreSQL server for tests: initdb into a temporary directory, then run it.

    server = PgServer()             # nothing runs yet; PgServer(fast=True) for speed
    PgServer(directory, wal_segment_mb=1, wal_dir=path)   # where the test says; small
                                    # WAL files, in a directory of their own
    server.start()                  # initdb on first start, then postgres on a free port
    server.url                      # postgresql://postgres@127.0.0.1:PORT/postgres
    url = server.create_database("store_test")
    server.kill()                   # SIGKILL the postmaster and every backend: a crash
    server.start()                  # crash recovery from the WAL, same port, same data
    server.stop()                   # fast shutdown (clean checkpoint)
    server.cleanup()                # stop (or kill) and remove the directory

It never touches the machine's own cluster (port 5432, /var/lib/postgresql): it listens
on 127.0.0.1 at a port of its own, keeps its unix socket in its own directory, and
trusts every local connection (user `postgres`, no password).

PostgreSQL refuses to run as root. When the tests run as root, initdb and postgres run
as the `postgres` system user through `runuser -u postgres --`, and the directory is
created under the system temporary directory (pytest's own tmp dirs are private to
root) and owned by `postgres`.

Durability: by default the server keeps PostgreSQL's durable settings (fsync, full page
writes, synchronous commit), so crash tests mean something. `fast=True` turns them off
for suites that only need a database, never for one that kills the server. initdb runs
with --no-sync in both cases: that only matters for an OS crash right after initdb,
which no test can cause.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import LiteralString

from tests.helpers import free_port, port_open, wait_until

__all__ = ["PgServer", "PgServerError", "find_bin_dir", "unavailable_reason"]

HOST = "127.0.0.1"
SYSTEM_USER = "postgres"   # the OS user postgres runs as when we are root
DB_USER = "postgres"       # the database superuser initdb creates
_NAME_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class PgServerError(RuntimeError):
    """The test server could not be set up, started or stopped (the log is attached)."""


def find_bin_dir() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin with initdb and postgres, else the
    directory of `postgres` on PATH, else None."""
    candidates = []
    for path in Path("/usr/lib/postgresql").glob("*/bin"):
        if (path / "postgres").is_file() and (path / "initdb").is_file():
            try:
                candidates.append((float(path.parent.name), path))
            except ValueError:
                continue
    if candidates:
        return max(candidates)[1]
    found = shutil.which("postgres")
    if found and shutil.which("initdb"):
        return Path(found).parent
    return None


def unavailable_reason() -> str | None:
    """Why a PgServer cannot run here (a sentence for pytest.skip), or None if it can."""
    if find_bin_dir() is None:
        return ("PostgreSQL server binaries (initdb, postgres) not found under "
                "/usr/lib/postgresql/*/bin or on PATH; apt-get install postgresql "
                "(scripts/test.sh does it when run as root)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            return (f"running as root, and there is no {SYSTEM_USER!r} user to run "
                    "PostgreSQL as (it refuses to run as root)")
        if shutil.which("runuser") is None:
            return "running as root without runuser(1) to start PostgreSQL as another user"
    return None


class PgServer:
    """One PostgreSQL server in its own directory, started and stopped on demand."""

    def __init__(self, directory: str | os.PathLike[str] | None = None, *,
                 port: int | None = None, fast: bool = False,
                 bin_dir: str | os.PathLike[str] | None = None,
                 wal_segment_mb: int | None = None,
                 wal_dir: str | os.PathLike[str] | None = None) -> None:
        found = Path(bin_dir) if bin_dir is not None else find_bin_dir()
        if found is None:
            raise PgServerError(unavailable_reason() or "no PostgreSQL binaries")
        self.bin_dir = found
        self.as_root = os.geteuid() == 0
        self._own_directory = directory is None
        if directory is None:
            directory = tempfile.mkdtemp(prefix="waystation-pg-")
        self.directory = Path(directory).resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.directory / "data"
        self.log_path = self.directory / "postgres.log"
        self.port = port if port is not None else free_port(HOST)
        self.fast = fast
        # initdb --wal-segsize (a power of two, 1 to 1024; PostgreSQL's default is 16):
        # small segments make the WAL need a new file soon, for disk-full tests.
        self.wal_segment_mb = wal_segment_mb
        # initdb --waldir: the WAL on a disk of its own (pg_wal becomes a symlink to it).
        self.wal_dir = None if wal_dir is None else Path(wal_dir).resolve()
        self._proc: subprocess.Popen[bytes] | None = None
        if self.as_root:
            entry = pwd.getpwnam(SYSTEM_USER)
            os.chown(self.directory, entry.pw_uid, entry.pw_gid)
            os.chmod(self.directory, 0o700)

    # ------------------------------------------------------------------ addresses

    @property
    def url(self) -> str:
        """postgresql://postgres@127.0.0.1:PORT/postgres"""
        return self.url_for("postgres")

    def url_for(self, dbname: str) -> str:
        """The URL of database `dbname` on this server."""
        return f"postgresql://{DB_USER}@{HOST}:{self.port}/{dbname}"

    @property
    def socket_dir(self) -> Path:
        """The directory holding the unix socket (.s.PGSQL.PORT)."""
        return self.directory

    # ------------------------------------------------------------------ lifecycle

    @property
    def running(self) -> bool:
        """True while the postmaster process we started is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The postmaster's PID (from postmaster.pid), while it runs."""
        fields = self._pid_file()
        return int(fields[0]) if fields and self.running else None

    def initdb(self) -> None:
        """Create the cluster (done by the first start())."""
        if (self.data_dir / "PG_VERSION").exists():
            return
        cmd = [str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-U", DB_USER,
               "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync"]
        if self.wal_segment_mb is not None:
            cmd.append(f"--wal-segsize={self.wal_segment_mb}")
        if self.wal_dir is not None:
            cmd.append(f"--waldir={self.wal_dir}")
        result = subprocess.run(self._as_postgres(cmd), cwd=self.directory, env=self._env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False)
        if result.returncode != 0:
            raise PgServerError(f"initdb failed ({result.returncode}):\n"
                                f"{result.stdout.decode(errors='replace')}")
        settings = [
            "",
            "# --- tests/pgserver.py",
            f"listen_addresses = '{HOST}'",
            f"port = {self.port}",
            f"unix_socket_directories = '{self.socket_dir}'",
            "max_connections = 100",
            "shared_buffers = 32MB",
            "logging_collector = off",
            "log_min_messages = warning",
        ]
        if self.fast:
            settings += ["fsync = off", "synchronous_commit = off", "full_page_writes = off"]
        with (self.data_dir / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write("\n".join(settings) + "\n")

    def start(self, timeout: float = 60.0) -> PgServer:
        """Start postgres (initdb first if needed) and wait until it accepts connections.

        After a kill() this is crash recovery: it waits for the WAL replay too.
        """
        if self.running:
            raise PgServerError("already running")
        self.initdb()
        cmd = [str(self.bin_dir / "postgres"), "-D", str(self.data_dir)]
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(self._as_postgres(cmd), cwd=self.directory,
                                          env=self._env(), stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until(lambda: not self.running or self._ready(), timeout,
                       message=lambda: f"postgres ready on port {self.port}:\n{self.log_tail()}")
        except AssertionError as exc:
            self.kill()
            raise PgServerError(str(exc)) from None
        if not self.running:
            raise PgServerError(f"postgres exited at start:\n{self.log_tail()}")
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Fast shutdown (SIGINT: end sessions, write a shutdown checkpoint), then wait."""
        if not self.running:
            self._proc = None
            return
        assert self._proc is not None
        pid = self.pid
        if pid is None:
            self._proc.terminate()   # no postmaster.pid yet: runuser passes SIGTERM on
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise PgServerError(
                f"postgres did not stop in {timeout} s:\n{self.log_tail()}") from None
        self._proc = None

    def kill(self, timeout: float = 30.0) -> None:
        """kill -9 the postmaster and every process it started, all at once: a crash.

        Nothing is written on the way down; the next start() recovers from the WAL. Waits
        until every one of those processes is gone, so that start() can follow at once.
        """
        if self._proc is None:
            return
        postmaster = self.pid
        victims: list[int] = []
        if postmaster is not None:
            victims = [postmaster, *_children(postmaster)]
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self._proc.poll() is None and postmaster is None:
            self._proc.kill()    # never got as far as writing postmaster.pid
        self._proc.wait(timeout)
        self._proc = None
        wait_until(lambda: not any(_alive(pid) for pid in victims), timeout,
                   message="every postgres process gone after SIGKILL")

    def processes(self) -> list[int]:
        """The PIDs to stop and continue to freeze the server (SIGSTOP, then SIGCONT): the
        launcher (runuser, when root), the postmaster and every process it started.
        runuser stops itself when its child stops and stays stopped after the child's
        SIGCONT, so it must be continued too (else nothing reaps the postmaster)."""
        assert self._proc is not None and self.pid is not None, "postgres is not running"
        return [self._proc.pid, self.pid, *_children(self.pid)]

    def restart(self, timeout: float = 60.0) -> PgServer:
        """stop() then start() on the same port and data."""
        self.stop(timeout)
        return self.start(timeout)

    def cleanup(self) -> None:
        """Stop (kill if it will not stop) and remove the directory if we created it."""
        try:
            self.stop()
        except PgServerError:
            self.kill()
        if self._own_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> PgServer:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.cleanup()

    # ------------------------------------------------------------------ databases

    def create_database(self, name: str) -> str:
        """CREATE DATABASE `name` (a plain lower-case identifier); returns its URL."""
        if not _NAME_RE.match(name):
            raise ValueError(f"{name!r}: use lower-case letters, digits and '_' (max 63)")
        self._execute("CREATE DATABASE {}", name)
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        """DROP DATABASE `name` if it exists, disconnecting its sessions first."""
        if not _NAME_RE.match(name):
            raise ValueError(f"{name!r} is not a database name this helper creates")
        self._execute("DROP DATABASE IF EXISTS {} WITH (FORCE)", name)

    def _execute(self, template: LiteralString, name: str) -> None:
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL(template).format(sql.Identifier(name)))

    # ------------------------------------------------------------------ internals

    def log_tail(self, lines: int = 40) -> str:
        """The end of the server log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log yet)"
        return "\n".join(text.splitlines()[-lines:])

    def _as_postgres(self, cmd: list[str]) -> list[str]:
        return ["runuser", "-u", SYSTEM_USER, "--", *cmd] if self.as_root else cmd

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C", TZ="UTC")
        return env

    def _pid_file(self) -> list[str]:
        try:
            return (self.data_dir / "postmaster.pid").read_text().splitlines()
        except (FileNotFoundError, PermissionError):
            return []

    def _ready(self) -> bool:
        # Line 8 of postmaster.pid is the postmaster's status (PostgreSQL >= 10); pg_ctl
        # waits for "ready" the same way. The port check rules out a stale file.
        fields = self._pid_file()
        return len(fields) >= 8 and fields[7].strip() == "ready" and port_open(HOST, self.port)


def _children(parent: int) -> list[int]:
    """PIDs whose parent is `parent` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may contain spaces and parentheses.
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == parent:
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (a zombie holds no resources)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:].split()[0] != "Z"

