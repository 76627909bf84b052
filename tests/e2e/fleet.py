"""A whole Waystation fleet as real processes, for end-to-end tests.

    fleet = Fleet(tmp_path, "embedded")        # or "mosquitto" (the production config)
    fleet = Fleet(tmp_path, "mosquitto", "postgres", pg_url)   # servers on PostgreSQL
    fleet.start()                              # broker, server login, server process
    fleet.add_device("van-1", ["depot-7"])     # `waystation device add` (the CLI's main)
    fleet.start_agent("van-1")                 # `waystation agent run --config ...`
    fleet.start_agents("van-2", "van-3")       # side by side, each waited for; stop_agents
    fleet.agent("van-1").increment(...)        # the device's LMDB store, from this process
    fleet.wait_drained("van-1")                # outbox empty (server acked everything)
    assert fleet.mismatches("van-1") == []     # waystation.convergence.compare
    fleet.kill_agent("van-1") / kill_server() / kill_broker()   # SIGKILL, as a crash
    fleet.close()

More merge servers (PostgreSQL store, Mosquitto's shared subscription), metrics and TLS:

    fleet = Fleet(tmp_path, "mosquitto", "postgres", pg_url, metrics=True, device_tls=True)
    fleet.add_server("server-2")               # same database, same shared group
    fleet.start_server("server-2"); fleet.kill_server("server-2")
    fleet.metrics("server-2")                  # its Prometheus endpoint, parsed
    fleet.edit_agent_config("van-1", fn)       # fn(toml_data) edits it; the next start reads it
    # device_tls: `device add` enrols devices on Mosquitto's TLS listener ([enrol] with
    # the fleet's CA); client_certs: that listener requires a client certificate signed
    # by a separate device CA (the documented alternative), which `device add` issues.

Everything talks MQTT over TCP on 127.0.0.1; the broker, the merge server and every
agent are subprocesses started from the installed `waystation` command (Mosquitto from
its binary), each logging to its own file under the fleet's directory (JSON lines for
Waystation processes, so tests can wait on logged events). The test process opens the
agents' stores through `agent.api.Agent` and the server's store through
`broker.server.store.open_store` (LMDB or PostgreSQL, as the server config says): LMDB lets
several processes use one environment and PostgreSQL gives each read a snapshot of its
own, so it reads (and an agent's store also takes writes) while the daemons run.

Nothing here sleeps and hopes: every wait is `tests.helpers.wait_until` on a condition,
with a deadline, and fails with the tails of the logs.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypeVar

from agent.api import Agent
from broker.server.identity import outcome_ns
from broker.server.store import open_store
from broker.server.store.base import Store
from schemas.collection import Catalog, load_catalog
from tests.fixtures_brokers import BrokerProcess
from tests.helpers import RecordingClient, free_port, terminate, wait_exit, wait_until
from tests.mosquitto_prod import MOSQUITTO, write_production_conf
from tests.tlsca import CertificateAuthority, make_ca, make_server_cert
from waystation import merge
from waystation.cli import main as cli_main
from waystation.config import AgentConfig, ServerConfig, dump_toml, load_config
from waystation.convergence import Mismatch, compare

__all__ = ["BROKER_KINDS", "MOSQUITTO", "SERVER_USER", "STORE_KINDS", "Fleet", "Proc",
           "waystation_argv"]

T = TypeVar("T")
BrokerKind = Literal["embedded", "mosquitto"]
BROKER_KINDS: tuple[BrokerKind, ...] = ("embedded", "mosquitto")
StoreKind = Literal["lmdb", "postgres"]
STORE_KINDS: tuple[StoreKind, ...] = ("lmdb", "postgres")
SERVER_USER = "waystation-server"
SHARED_GROUP = "waystation"

FAST_SYNC: dict[str, Any] = {
    "ack_timeout_s": 2.0,
    "gap_timeout_s": 1.0,
    "backoff_initial_s": 0.1,
    "backoff_max_s": 1.0,
    "status_interval_s": 2.0,
}
"""Short sync timings for every test agent (the defaults are made for cellular links)."""

START_TIMEOUT_S = 30.0
# A process stopped on purpose must exit 0 within this; generous for a loaded 2-core host
# (a clean shutdown takes well under a second), far below "hangs forever".
STOP_TIMEOUT_S = 20.0


def waystation_argv(*args: str) -> list[str]:
    """The installed `waystation` command (next to this interpreter) with `args`."""
    script = Path(sys.executable).with_name("waystation")
    if script.exists():
        return [str(script), *args]
    return [sys.executable, "-m", "waystation", *args]


def _clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without WAYSTATION_* settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WAYSTATION_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


# ---------------------------------------------------------------------- processes


class Proc:
    """One daemon subprocess (server or agent) with its log file, restartable.

    Each start appends to the same log and remembers where its output begins, so
    `events()` and `wait_event()` see only the current run.
    """

    def __init__(self, name: str, argv: list[str], log_path: Path, cwd: Path) -> None:
        self.name, self.argv, self.log_path, self.cwd = name, argv, log_path, cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self._offset = 0
        self.starts = 0

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} never started"
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def start(self, env: Mapping[str, str] | None = None) -> Proc:
        assert not self.running, f"{self.name} is already running"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._offset = log.tell()
            header = f"----- {self.name} start #{self.starts + 1}: {' '.join(self.argv)}\n"
            log.write(header.encode())
            self._offset += len(header.encode())
            log.flush()
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=self.cwd, env=_clean_env(env),
                                         start_new_session=True)
        self.starts += 1
        return self

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (a clean shutdown) and wait: it must exit with code 0 within `timeout`
        (AssertionError with its log otherwise; a hung process is SIGKILLed first).
        None when it never started; its earlier exit code when it had already ended."""
        if self.proc is None:
            return None
        if self.proc.poll() is not None:
            return self.proc.returncode
        if not terminate(self.proc, timeout):
            raise AssertionError(f"{self.name} ignored SIGTERM for {timeout} s:\n"
                                 f"{self.log_tail()}")
        if self.proc.returncode != 0:
            raise AssertionError(f"{self.name} exited {self.proc.returncode} on SIGTERM, "
                                 f"not 0:\n{self.log_tail()}")
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL (kill -9): no chance to flush, say goodbye or clean up."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(15)

    def wait_exit(self, timeout: float) -> int:
        """Wait for the process to end by itself; its exit code (-9 for SIGKILL)."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still running after {timeout} s:\n"
                                 f"{self.log_tail()}") from None

    def output(self) -> str:
        """The log of the current run."""
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(self._offset)
                return fh.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def events(self, event: str | None = None) -> list[dict[str, Any]]:
        """The JSON log events of the current run (named `event`, when given)."""
        out: list[dict[str, Any]] = []
        for line in self.output().splitlines():
            if not line.startswith("{"):
                continue
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if isinstance(doc, dict) and (event is None or doc.get("event") == event):
                out.append(doc)
        return out

    def wait_event(self, event: str, timeout: float = START_TIMEOUT_S,
                   where: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
        """Wait until the current run logs `event` (matching `where`); fail if it dies."""
        def found() -> dict[str, Any] | None:
            for doc in self.events(event):
                if where is None or where(doc):
                    return doc
            if not self.running:
                raise AssertionError(f"{self.name} exited ({self.returncode}) before logging "
                                     f"{event!r}:\n{self.log_tail()}")
            return None
        return wait_until(found, timeout, interval=0.02,
                          message=lambda: f"{self.name} logs {event!r}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------- fleet


class Fleet:
    """Broker + merge server + device agents as subprocesses (see module docstring)."""

    def __init__(self, root: Path, broker_kind: BrokerKind, store_kind: StoreKind = "lmdb",
                 pg_url: str | None = None, *, metrics: bool = False, device_tls: bool = False,
                 client_certs: bool = False, merge: Mapping[str, int | str] | None = None
                 ) -> None:
        """`store_kind` "postgres" needs `pg_url` (an empty database: the servers create
        their schema). `metrics`: every server serves Prometheus metrics on a port of its
        own (`metrics()`). `device_tls` (Mosquitto): `device add` enrols devices on the TLS
        listener, verifying the broker with the fleet's CA; `client_certs` (implies it):
        that listener requires client certificates (a device CA of their own), issued by
        `device add`. `merge`: settings for every server's `[merge]` table."""
        if broker_kind not in BROKER_KINDS:
            raise ValueError(f"broker_kind must be one of {BROKER_KINDS}, not {broker_kind!r}")
        if store_kind not in STORE_KINDS:
            raise ValueError(f"store_kind must be one of {STORE_KINDS}, not {store_kind!r}")
        if (store_kind == "postgres") != (pg_url is not None):
            raise ValueError("pg_url goes with store_kind=\"postgres\" (and only with it)")
        if broker_kind == "mosquitto" and MOSQUITTO is None:
            raise RuntimeError("the mosquitto binary is not installed")
        if device_tls and not client_certs and broker_kind != "mosquitto":
            raise ValueError("device_tls without client_certs is a Mosquitto listener "
                             "setting")
        self.root = root
        self.kind: BrokerKind = broker_kind
        self.store_kind: StoreKind = store_kind
        self.pg_url = pg_url
        self.device_tls = device_tls or client_certs
        self.client_certs = client_certs
        self.metrics_enabled = metrics
        self.merge = dict(merge or {})
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.tls_port: int | None = None
        self.ca: CertificateAuthority | None = None
        """The fleet's CA (Mosquitto): it signs the broker's certificate."""
        self.device_ca: CertificateAuthority | None = None
        """With `client_certs`: the CA that signs device certificates (not the broker's)."""
        self.broker_dir = root / "broker"
        self.password_file = self.broker_dir / "passwd"
        self.broker_pid_file = self.broker_dir / "broker.pid"
        self.server_config = root / "server.toml"
        self.server_data = root / "server"
        self.devices_dir = root / "dev"
        self.data_dir = root / "data"  # short: the agent's wake socket path must fit AF_UNIX
        self.logs_dir = root / "logs"
        self.server_password = secrets.token_urlsafe(18)
        self.scopes: dict[str, tuple[str, ...]] = {}
        self.passwords: dict[str, str] = {}
        self.broker: BrokerProcess | None = None
        self.server = Proc("server", waystation_argv("server", "run", "--config",
                                                     str(self.server_config)),
                           self.logs_dir / "server.log", root)
        self.servers: dict[str, Proc] = {"server-1": self.server}
        """Every merge server by server_id; "server-1" is `server`."""
        self.server_configs: dict[str, Path] = {"server-1": self.server_config}
        self.metrics_ports: dict[str, int] = {}
        self.agents: dict[str, Proc] = {}
        self._open_agents: dict[str, Agent] = {}
        self._store: Store | None = None
        self._catalog: Catalog | None = None
        self._prepare_broker()
        self._write_server_config("server-1")

    # ------------------------------------------------------------------ setup

    def _prepare_broker(self) -> None:
        self.broker_dir.mkdir(parents=True, exist_ok=True)
        self.password_file.touch()
        if self.kind == "embedded":
            config = self.broker_dir / "broker.toml"
            lines = [
                'host = "127.0.0.1"',
                f"port = {self.port}",
                f'data_dir = "{self.broker_dir / "data"}"',
                f'password_file = "{self.password_file}"',
            ]
            if self.client_certs:
                # A TLS listener that requires a device certificate (CN = login).
                ca = self.ca = make_ca(self.broker_dir / "ca")
                cert = make_server_cert(ca, self.broker_dir / "cert")
                self.device_ca = make_ca(self.broker_dir / "device-ca",
                                         name="Waystation test device CA")
                self.tls_port = free_port()
                while self.tls_port == self.port:
                    self.tls_port = free_port()
                lines[1:1] = [f"tls_port = {self.tls_port}"]
                lines += ["[tls]", f'cert_file = "{cert.cert_path}"',
                          f'key_file = "{cert.key_path}"',
                          f'ca_file = "{self.device_ca.cert_path}"',
                          "require_client_cert = true"]
            config.write_text("\n".join([*lines, "[log]", 'level = "info"',
                                         'format = "json"', ""]))
            self.broker_config: Path | None = config
            argv = waystation_argv("broker", "run", "--config", str(config))
        else:
            ca = self.ca = make_ca(self.broker_dir / "ca")
            cert = make_server_cert(ca, self.broker_dir / "cert")
            tls_port = free_port()
            while tls_port == self.port:
                tls_port = free_port()
            self.tls_port = tls_port
            # The listener's cafile verifies client certificates; with client_certs that
            # is a device CA of its own (deploy/mosquitto/mosquitto.conf recommends one).
            if self.client_certs:
                self.device_ca = make_ca(self.broker_dir / "device-ca",
                                         name="Waystation test device CA")
            listener_ca = self.device_ca or ca
            conf = write_production_conf(self.broker_dir, port=self.port, tls_port=tls_port,
                                         ca=listener_ca.cert_path, cert=cert.cert_path,
                                         key=cert.key_path)
            if self.client_certs:
                _require_client_certificates(conf)
            self.broker_config = None
            assert MOSQUITTO is not None
            argv = [MOSQUITTO, "-c", str(conf)]
        self.broker = BrokerProcess(self.kind, argv, host="127.0.0.1", port=self.port,
                                    workdir=self.broker_dir, password_file=self.password_file)

    def _write_server_config(self, server_id: str) -> None:
        pw_file = self.root / "server.pw"
        pw_file.write_text(self.server_password + "\n")
        os.chmod(pw_file, 0o600)
        shared = json.dumps(SHARED_GROUP) if self.kind == "mosquitto" else "false"
        data_dir = self.server_data if server_id == "server-1" else self.root / server_id
        lines = [
            f"server_id = {json.dumps(server_id)}",
            f"data_dir = {json.dumps(str(data_dir))}",
            f"shared_group = {shared}",
        ]
        if self.metrics_enabled:
            port = self.metrics_ports[server_id] = free_port()
            lines.append(f"metrics_port = {port}")
        if self.store_kind == "postgres":
            lines += ["[store]", 'kind = "postgres"', f"url = {json.dumps(self.pg_url)}"]
        if self.merge:
            lines += ["[merge]", *(f"{k} = {json.dumps(v)}" for k, v in self.merge.items())]
        lines += [
            "[mqtt]",
            'host = "127.0.0.1"',
            f"port = {self.port}",
            f"password_file = {json.dumps(str(pw_file))}",
        ]
        # The broker's password file, for `device add` and for the server's steps of a
        # password rotation (Mosquitto: reloaded through its pid file).
        lines += ["[enrol]", f"password_file = {json.dumps(str(self.password_file))}"]
        if self.kind == "mosquitto":
            reload = ["sh", "-c", f"kill -HUP $(cat {self.broker_pid_file})"]
            lines.append(f"broker_reload = {json.dumps(reload)}")
        if self.device_tls:
            assert self.ca is not None and self.tls_port is not None
            lines += [
                'broker_host = "127.0.0.1"',
                f"broker_port = {self.tls_port}",
                f"ca_file = {json.dumps(str(self.ca.cert_path))}",
            ]
            if self.device_ca is not None:
                lines += [f"client_ca_cert = {json.dumps(str(self.device_ca.cert_path))}",
                          f"client_ca_key = {json.dumps(str(self.device_ca.key_path))}"]
        lines += ["[log]", 'level = "info"', 'format = "json"', ""]
        self.server_configs[server_id].write_text("\n".join(lines))

    @property
    def catalog(self) -> Catalog:
        if self._catalog is None:
            cfg = load_config(ServerConfig, self.server_config, {})
            self._catalog = load_catalog(cfg.schema_path())
        return self._catalog

    @property
    def collections(self) -> list[str]:
        return list(self.catalog.collections)

    def start(self, *, server: bool = True) -> Fleet:
        """Start the broker, create the server's login (`waystation broker passwd`) and,
        unless `server=False`, start the merge server."""
        self.add_login(SERVER_USER, self.server_password)
        self.start_broker()
        if server:
            self.start_server()
        return self

    # ------------------------------------------------------------------ CLI

    def cli(self, *args: str, input: str | None = None, check: bool = True,
            env: Mapping[str, str] | None = None, timeout: float = 60.0,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        """Run `waystation ARGS...` in the fleet's directory (or `cwd`); fail on a
        non-zero exit unless `check=False`."""
        result = subprocess.run(waystation_argv(*args), cwd=cwd or self.root,
                                env=_clean_env(env),
                                input=input, capture_output=True, text=True, timeout=timeout,
                                check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"waystation {' '.join(args)} exited {result.returncode}:\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result

    def cli_here(self, *args: str, input: str = "",
                 env: Mapping[str, str] | None = None) -> str:
        """`waystation ARGS...` run in this process (`waystation.cli.main`: the same parser
        and handler as the `waystation` command, with the environment `cli` gives it,
        `input` as standard input); fails on a non-zero exit; returns what it printed.

        For the fleet's own setup commands (logins, enrolment), which every fleet of the
        suite runs: a `waystation` process costs ~0.6 s of CPU under coverage. The tests
        that are about these commands run them as processes (tests/cli)."""
        out, err = io.StringIO(), io.StringIO()
        stdin = sys.stdin
        sys.stdin = io.StringIO(input)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = cli_main(list(args), env=_clean_env(env))
        finally:
            sys.stdin = stdin
        if code != 0:
            raise AssertionError(f"waystation {' '.join(args)} exited {code}:\n"
                                 f"{out.getvalue()}\n{err.getvalue()}")
        return out.getvalue()

    def add_login(self, user: str, password: str) -> None:
        """A broker login only (`waystation broker passwd --stdin`, in this process:
        `cli_here`; tests/cli/test_broker_passwd_process.py runs it as a process), no
        registry entry."""
        if self.broker_config is not None:
            where = ["--config", str(self.broker_config)]
        else:
            where = ["--password-file", str(self.password_file)]
        self.cli_here("broker", "passwd", *where, "--stdin", user, input=password + "\n")
        self.passwords[user] = password
        self._reload_logins(user, password)

    def add_device(self, dev: str, scopes: Sequence[str], *,
                   sync: Mapping[str, Any] | None = None) -> Path:
        """Enrol `dev` with `waystation device add` (registry entry, broker login, agent
        config; in this process, `cli_here`: tests/cli/test_single_machine.py runs it as a
        process), then give the agent config a data_dir, test sync timings (`FAST_SYNC`
        updated with `sync`) and JSON logs. Returns the agent config path."""
        args = ["device", "add", dev, "--out", str(self.devices_dir),
                "--config", str(self.server_config)]
        for scope in scopes:
            args += ["--scope", scope]
        env = {"WAYSTATION_BROKER__PASSWORD_FILE": str(self.password_file)}
        if self.store_kind == "lmdb" and self._store is not None:
            # This process has the server's LMDB environment open: a second handle in
            # the same process, closed again by the command, would drop the first one's
            # locks (LMDB's rule), so the command runs as a process of its own.
            self.cli(*args, env=env)
        else:
            self.cli_here(*args, env=env)
        path = self.agent_config_path(dev)

        def adjust(data: dict[str, Any]) -> None:
            data["data_dir"] = str(self.data_dir / dev)
            data["sync"] = {**FAST_SYNC, **(sync or {})}
            data["log"] = {"level": "info", "format": "json"}

        cfg = self.edit_agent_config(dev, adjust)
        password = cfg.mqtt.password
        assert password is not None
        self.passwords[dev] = password.get_secret_value()
        self.scopes[dev] = tuple(scopes)
        self.agents[dev] = Proc(dev, waystation_argv("agent", "run", "--config", str(path)),
                                self.logs_dir / f"{dev}.log", self.root)
        self._reload_logins(dev, self.passwords[dev])
        return path

    def _reload_logins(self, user: str, password: str) -> None:
        # The embedded broker rereads the password file at the next connection;
        # Mosquitto only on SIGHUP - and the reload is done once the new login works.
        if self.kind != "mosquitto" or self.broker is None or not self.broker.running:
            return
        assert self.broker.proc is not None
        self.broker.proc.send_signal(signal.SIGHUP)

        def accepted() -> bool:
            probe = RecordingClient(self.port, f"probe-{secrets.token_hex(4)}", user, password)
            try:
                return probe.connect(timeout=5) == "Success"
            finally:
                probe.close()

        wait_until(accepted, 15, interval=0.05,
                   message=lambda: f"mosquitto accepts the new login {user}:\n"
                                   f"{self.broker_log_tail()}")

    def agent_config_path(self, dev: str) -> Path:
        return self.devices_dir / f"{dev}.toml"

    def edit_agent_config(self, dev: str, edit: Callable[[dict[str, Any]], None]
                          ) -> AgentConfig:
        """Rewrite the device's agent config: `edit` changes its TOML data in place (the
        daemon reads the file when it starts). Returns the config as written."""
        path = self.agent_config_path(dev)
        data = tomllib.loads(path.read_text())
        edit(data)
        cfg = AgentConfig.model_validate(data)
        path.write_text(dump_toml(cfg, mask_secrets=False, exclude_defaults=True,
                                  header=f"{dev}: written by `waystation device add`, "
                                         "adjusted by tests/e2e/fleet.py"))
        return cfg

    def agent_config(self, dev: str) -> AgentConfig:
        return load_config(AgentConfig, self.agent_config_path(dev), {})

    # ------------------------------------------------------------------ broker

    def start_broker(self) -> None:
        assert self.broker is not None
        self.broker.start(timeout=START_TIMEOUT_S)
        self._note_broker_pid()

    def _note_broker_pid(self) -> None:
        assert self.broker is not None and self.broker.proc is not None
        self.broker_pid_file.write_text(f"{self.broker.proc.pid}\n")

    def stop_broker(self) -> None:
        assert self.broker is not None
        self.broker.stop()

    def kill_broker(self) -> None:
        """SIGKILL the broker (the embedded one keeps nothing; Mosquitto keeps what its
        last autosave wrote)."""
        assert self.broker is not None
        self.broker.kill()

    def restart_broker(self, *, hard: bool = True) -> None:
        """Kill (or stop) the broker and start it again on the same port."""
        assert self.broker is not None
        self.broker.restart(hard=hard)
        self._note_broker_pid()

    def broker_log_tail(self, lines: int = 40) -> str:
        return "(no broker)" if self.broker is None else self.broker.log_tail(lines)

    # ------------------------------------------------------------------ server

    def add_server(self, server_id: str) -> Proc:
        """Another merge server (not started): its own config and log, the same store
        (PostgreSQL) and shared subscription group (Mosquitto) as the first."""
        if self.store_kind != "postgres" or self.kind != "mosquitto":
            raise ValueError("several merge servers need the PostgreSQL store and "
                             "Mosquitto's shared subscriptions")
        if server_id in self.servers:
            raise ValueError(f"{server_id} exists already")
        self.server_configs[server_id] = self.root / f"{server_id}.toml"
        self._write_server_config(server_id)
        proc = Proc(server_id, waystation_argv("server", "run", "--config",
                                               str(self.server_configs[server_id])),
                    self.logs_dir / f"{server_id}.log", self.root)
        self.servers[server_id] = proc
        return proc

    def start_server(self, server_id: str = "server-1", *,
                     env: Mapping[str, str] | None = None, wait: bool = True) -> Proc:
        """`waystation server run --config server.toml` (with extra `env`, e.g. the
        WAYSTATION_FAILPOINT test hook); waits until it has connected to the broker
        (and serves its metrics, when they are on)."""
        proc = self.servers[server_id]
        for attempt in range(3):
            if self.metrics_enabled:
                self._new_metrics_port(server_id)
            proc.start(env)
            if not wait:
                return proc
            try:
                proc.wait_event("server_connected")
                if self.metrics_enabled:
                    proc.wait_event("server_started")   # logged once the endpoint listens
                return proc
            except AssertionError:
                # A port free when chosen can be taken before the server binds it (by
                # any outgoing connection's ephemeral port): choose another one.
                if proc.running or attempt == 2 or "Address already in use" not in proc.output():
                    raise
        return proc

    def _new_metrics_port(self, server_id: str) -> None:
        """A port free right now for the server's metrics endpoint, into its config."""
        path = self.server_configs[server_id]
        port = self.metrics_ports[server_id] = free_port()
        text, count = re.subn(r"(?m)^metrics_port = \d+$", f"metrics_port = {port}",
                              path.read_text())
        assert count == 1, f"{path}: no metrics_port line"
        path.write_text(text)

    def stop_server(self, server_id: str = "server-1") -> int | None:
        return self.servers[server_id].stop()

    def kill_server(self, server_id: str = "server-1") -> None:
        self.servers[server_id].kill()

    def close_store(self) -> None:
        """Close this process's handle on the server's store (before the store's files
        are replaced, e.g. by a restore); `store` opens it again when next used."""
        if self._store is not None:
            self._store.close()
            self._store = None

    def metrics(self, server_id: str = "server-1") -> dict[str, float]:
        """The server's Prometheus endpoint, scraped now: sample -> value, the sample
        written as in the exposition format, e.g.
        ``waystation_server_changes_total{outcome="applied"}``."""
        port = self.metrics_ports.get(server_id)
        if port is None:
            raise ValueError("metrics are off: Fleet(..., metrics=True)")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        return parse_metrics(text)

    # ------------------------------------------------------------------ agents

    def start_agent(self, dev: str, *, wait: bool = True) -> Proc:
        """`waystation agent run --config devices/DEV.toml`; waits until it connected."""
        proc = self.agents[dev].start()
        if wait:
            proc.wait_event("connected", where=lambda e: e.get("logger") == "waystation.agent")
        return proc

    def start_agents(self, *devs: str) -> None:
        """`start_agent` for each of `devs`, all started before the first is waited for:
        their interpreters start side by side (most of an agent's start is its imports),
        and each must still log "connected"."""
        for dev in devs:
            self.start_agent(dev, wait=False)
        for dev in devs:
            self.agents[dev].wait_event("connected",
                                        where=lambda e: e.get("logger") == "waystation.agent")

    def stop_agent(self, dev: str) -> int | None:
        """SIGTERM: the daemon finishes its batch in flight and says it is offline."""
        return self.agents[dev].stop()

    def stop_agents(self, *devs: str) -> list[int | None]:
        """`stop_agent` for each of `devs` side by side (one thread each, so their clean
        shutdowns overlap); each must exit 0 as with `stop_agent`. Their exit codes."""
        with ThreadPoolExecutor(max_workers=max(1, len(devs))) as pool:
            return list(pool.map(self.stop_agent, devs))

    def kill_agent(self, dev: str) -> None:
        self.agents[dev].kill()

    def agent(self, dev: str) -> Agent:
        """The device's store, opened in this process (kept open until `close()`)."""
        ag = self._open_agents.get(dev)
        if ag is None:
            ag = Agent.open(self.agent_config(dev), self.catalog, env={})
            self._open_agents[dev] = ag
        return ag

    def close_agents(self) -> None:
        """Close the device stores this process opened (e.g. before a remote wipe
        replaces them; `agent()` opens them again)."""
        for ag in self._open_agents.values():
            with contextlib.suppress(Exception):
                ag.close()
        self._open_agents.clear()

    def outcome_ns(self, dev: str) -> str:
        """Where the server keeps the outcomes of the device's changes: the device id
        and its store's incarnation (`broker.server.identity.outcome_ns`)."""
        inc = self.agent(dev).sync.hello("test").inc
        return outcome_ns(dev, inc)

    def pending(self, dev: str) -> int:
        return self.agent(dev).status().pending

    def agent_status(self, dev: str) -> dict[str, Any]:
        """`waystation agent status --json` (a separate process, next to the daemon)."""
        out = self.cli("agent", "status", "--json", "--config",
                       str(self.agent_config_path(dev))).stdout
        doc: dict[str, Any] = json.loads(out)
        return doc

    def wait_agent_status(self, dev: str, predicate: Callable[[dict[str, Any]], bool],
                          timeout: float, *, what: str) -> dict[str, Any]:
        """Wait until `agent_status` (`waystation agent status --json`, a process of its
        own) satisfies `predicate`; returns that document. The same status is polled in
        this process first (`Agent.status().to_dict()`, what the command prints but its
        client_cert), so the command runs once or twice instead of back to back for the
        whole wait (each run costs ~0.6 s of CPU under coverage). Opens the device's store
        here (`agent`): for tests that have it open already."""
        deadline = time.monotonic() + timeout
        ag = self.agent(dev)
        with contextlib.suppress(AssertionError):
            wait_until(lambda: predicate(ag.status().to_dict()), timeout, interval=0.02)
        # The command has the last word, with what is left of the deadline (a few
        # seconds at least: a process start under load).
        return self.wait(lambda: (doc if predicate(doc := self.agent_status(dev)) else None),
                         max(deadline - time.monotonic(), 5.0), what=what)

    # ------------------------------------------------------------------ server store

    @property
    def store(self) -> Store:
        """The server's store, opened in this process (readable while the server runs)."""
        if self._store is None:
            self._store = open_store(load_config(ServerConfig, self.server_config, {}))
        return self._store

    def record(self, c: str, k: str) -> dict[str, Any] | None:
        """The server's record as a wire state (§6: c, k, s, q, f, h, t, cf, x)."""
        with self.store.read() as txn:
            raw = txn.get_record(c, k)
        return None if raw is None else merge.to_rec(merge.from_json(raw))

    def value(self, c: str, k: str, name: str) -> Any:
        rec = self.record(c, k)
        return None if rec is None else rec.get("f", {}).get(name)

    def scope_seq(self, scope: str) -> int:
        with self.store.read() as txn:
            return txn.scope_seq(scope)

    def server_dead_letters(self) -> list[dict[str, Any]]:
        """`waystation server deadletters --json` (the operator CLI, a separate process)."""
        out = self.cli("server", "deadletters", "--json", "--limit", "500", "--config",
                       str(self.server_config)).stdout
        docs: list[dict[str, Any]] = json.loads(out)
        return docs

    # ------------------------------------------------------------------ convergence

    def mismatches(self, dev: str) -> list[Mismatch]:
        """Records of the device's scopes on which its view differs from the server's."""
        return compare(self.store, self.agent(dev), self.scopes[dev], self.collections)

    def wait_drained(self, *devs: str, timeout: float = 60.0) -> None:
        """Wait until each device's outbox is empty (the server acked or rejected all)."""
        def drained() -> bool:
            return all(self.pending(d) == 0 for d in devs)

        wait_until(drained, timeout, interval=0.05, message=lambda: self.describe(
            "nothing pending on " + ", ".join(f"{d} ({self.pending(d)} left)" for d in devs)))

    def wait_converged(self, *devs: str, timeout: float = 60.0) -> None:
        """Wait until each device has nothing pending and its view equals the server's."""
        devs = devs or tuple(self.scopes)

        def done() -> bool:
            return all(self.pending(d) == 0 and not self.mismatches(d) for d in devs)

        def why() -> str:
            lines = []
            for d in devs:
                found = self.mismatches(d)
                lines.append(f"{d}: {self.pending(d)} pending, {len(found)} mismatches "
                             + "; ".join(m.describe() for m in found[:5]))
            return self.describe("convergence:\n" + "\n".join(lines))

        wait_until(done, timeout, interval=0.1, message=why)

    def wait(self, predicate: Callable[[], T | None], timeout: float = 60.0, *,
             what: str = "condition", interval: float = 0.02) -> T:
        """`wait_until` whose failure message carries the fleet's log tails."""
        return wait_until(predicate, timeout, interval=interval,
                          message=lambda: self.describe(what))

    # ------------------------------------------------------------------ diagnostics

    def log_paths(self) -> dict[str, Path]:
        paths = {"broker": self.broker.log_path} if self.broker is not None else {}
        for server_id, proc in self.servers.items():
            paths["server" if server_id == "server-1" else server_id] = proc.log_path
        for dev, proc in self.agents.items():
            paths[dev] = proc.log_path
        return paths

    def log_tails(self, lines: int = 30) -> str:
        out = []
        for name, path in self.log_paths().items():
            try:
                text = path.read_text(errors="replace").splitlines()
            except FileNotFoundError:
                continue
            out.append(f"===== {name} ({path}), last {lines} lines\n" + "\n".join(text[-lines:]))
        return "\n".join(out)

    def describe(self, what: str) -> str:
        return f"{what}\n{self.log_tails(15)}"

    # ------------------------------------------------------------------ teardown

    def close(self, *, check: bool = True) -> None:
        """Stop every process (agents and servers together, then the broker) and close
        the open stores. Each process still running is stopped on purpose, so with
        `check` it must exit with code 0 within STOP_TIMEOUT_S: a shutdown that hangs or
        crashes fails the test (AssertionError naming each, after everything is down)."""
        daemons = [*self.agents.values(), *self.servers.values()]
        stopping = [proc for proc in daemons if proc.running]
        for proc in stopping:   # all shut down at once, each as cleanly as by stop()
            with contextlib.suppress(ProcessLookupError):
                proc.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        problems = []
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc in stopping:
            assert proc.proc is not None
            try:
                code = wait_exit(proc.proc, max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                problems.append(f"{proc.name} still running {STOP_TIMEOUT_S} s after "
                                f"SIGTERM (killed):\n{proc.log_tail()}")
                proc.kill()
                continue
            if code != 0:
                problems.append(f"{proc.name} exited {code} on SIGTERM, not 0:\n"
                                f"{proc.log_tail()}")
        if self.broker is not None:
            try:
                self.broker.stop()
            except AssertionError as exc:
                problems.append(str(exc))
        self.close_agents()
        with contextlib.suppress(Exception):
            self.close_store()
        if check and problems:
            raise AssertionError("unclean shutdown at teardown:\n" + "\n".join(problems))

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None:
            print(f"\n{self.log_tails(60)}")
        # after a failure, the first error is the one to read: do not pile another on it
        self.close(check=exc_type is None)



def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {sample (name and labels as written): value}."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        sample, _, value = line.rpartition(" ")
        out[sample] = float(value)
    return out


def _require_client_certificates(conf: Path) -> None:
    """Switch the rendered production config's TLS listener to client-certificate
    authentication, exactly as its comment says: replace `require_certificate false`
    with `require_certificate true` + `use_identity_as_username true`."""
    text = conf.read_text()
    old = "\nrequire_certificate false\n"
    assert text.count(old) == 1, f"{conf}: expected one `require_certificate false` line"
    conf.write_text(text.replace(
        old, "\nrequire_certificate true\nuse_identity_as_username true\n"))
