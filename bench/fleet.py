"""Harness for the system benchmarks: a broker, the merge server and devices, each a process.

    with Fleet("mosquitto", workdir, {"van-1": ["route-1"]}) as fleet:
        fleet.start_broker()
        ...                                  # raw limits against fleet.port
        fleet.start_server()
        dev = fleet.device("van-1")          # a bench.device subprocess (agent + daemon)
        dev.call("write", count=1000)
        dev.call("drain")

What runs where, and why (the benchmarks measure the system as deployed):

- The broker is a subprocess: Mosquitto started from deploy/mosquitto/mosquitto.conf
  (rendered by tests/mosquitto_prod.py, as the tests run it: paths, ports and user
  rewritten, nothing else; its TLS listener gets a throwaway
  certificate, its plain listener on a free loopback port is what everyone uses), or
  the embedded amqtt broker as `python -m broker.embedded`.
- The merge server is a subprocess: `waystation server run --config server.toml`, the
  command the systemd unit runs, with an LMDB store in its own directory, or several
  of them (`start_servers(n)`) sharing one PostgreSQL database (`store=` settings)
  through Mosquitto's shared subscription. Each serves its metrics endpoint on a port
  of its own (`scrape(i)` reads it).
- Each device is a subprocess (`python -m bench.device`): the agent daemon and the
  app's writes in one process, as an app using the Python API runs. The command loop
  that drives it reads JSON lines on stdin and answers on stdout; it hooks the daemon's
  `apply_ack` / `apply_checkpoint` to timestamp acks as they are applied (no polling).

Times from different processes are compared with `time.perf_counter()`, which is
CLOCK_MONOTONIC on Linux: one clock for every process on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tests.mosquitto_prod import MOSQUITTO, write_production_conf

REPO = Path(__file__).resolve().parents[1]
PREFIX = "waystation"
SERVER_USER = "waystation-server"
PROBE = "bench-probe"
RAW_DEVICE = "raw-1"


def find_mosquitto() -> str | None:
    return MOSQUITTO


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def wait_for(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def proc_memory(pid: int) -> dict[str, int]:
    """VmRSS / RssAnon / RssFile of a process, in bytes."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as fh:
        for line in fh:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[name] = int(value.split()[0]) * 1024
    return out


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def tree_cpu_s(root: int, table: dict[int, tuple[int, float]] | None = None) -> float:
    """CPU seconds used so far by `root` and every process below it (e.g. PostgreSQL's
    postmaster and its backends), from /proc (exited children are not counted)."""
    table = table if table is not None else process_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += table.get(pid, (0, 0.0))[1]
        todo.extend(children.get(pid, ()))
    return total


def scrape_metrics(port: int, timeout: float = 5.0) -> dict[str, float]:
    """A Prometheus text endpoint on 127.0.0.1:`port` as {'name{labels}': value}."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def system_cpu_s() -> tuple[float, float]:
    """(busy, idle + iowait) CPU seconds of the whole machine so far, all cores."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    ticks = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / ticks, idle / ticks


def process_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds) of every process on the machine."""
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[int, float]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks)
    return out


class LoadMeter:
    """CPU used on this machine by anything other than this benchmark's processes (this
    one and its descendants): whole-machine busy time (/proc/stat) minus ours. Other
    work running at the same time disturbs the numbers, and the reports say how much
    there was (kernel work on our behalf, e.g. writeback, also lands in "other")."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.machine0 = system_cpu_s()[0]
        self.before = process_table()

    def result(self) -> dict[str, float]:
        after = process_table()
        machine = system_cpu_s()[0] - self.machine0
        secs = time.perf_counter() - self.t0
        me = os.getpid()

        def ours(pid: int) -> bool:
            for _ in range(64):
                if pid == me:
                    return True
                if pid <= 1:
                    return False
                pid = after.get(pid, (0, 0.0))[0]
            return False

        mine = sum(cpu - self.before.get(pid, (0, 0.0))[1]
                   for pid, (_, cpu) in after.items() if ours(pid))
        return {"ours_cores": mine / secs, "other_cores": max(0.0, machine - mine) / secs,
                "machine_cores": machine / secs}


def machine_text() -> str:
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    mosq = find_mosquitto()
    version = "not installed"
    if mosq:
        with contextlib.suppress(Exception):
            text = subprocess.run([mosq, "-h"], capture_output=True, text=True,
                                  timeout=5).stdout
            version = text.splitlines()[0].strip()
    return (f"{os.cpu_count()} x {cpu}, {mem:.0f} GiB RAM, Python {sys.version.split()[0]}, "
            f"{version}")


# ------------------------------------------------------------------ processes

class Process:
    """A subprocess with its output in a log file; stopped with SIGTERM."""

    def __init__(self, name: str, argv: list[str], workdir: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = workdir / f"{name}.log"
        workdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=REPO, env=env, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def start_broker(kind: str, workdir: Path, passwords: dict[str, str]) -> tuple[Process, int]:
    """Start the broker (`embedded` or `mosquitto`); returns (process, plain port)."""
    from broker.embedded.passwords import write_password_entry

    workdir.mkdir(parents=True, exist_ok=True)
    passwd = workdir / "passwd"
    for user, password in passwords.items():
        write_password_entry(passwd, user, password)
    port = free_port()
    if kind == "embedded":
        argv = [sys.executable, "-m", "broker.embedded", "--host", "127.0.0.1",
                "--port", str(port), "--password-file", str(passwd),
                "--data-dir", str(workdir / "data"), "--prefix", PREFIX,
                "--server-user", SERVER_USER, "--log-level", "warning"]
        proc = Process("broker-embedded", argv, workdir)
    elif kind == "mosquitto":
        mosq = find_mosquitto()
        if mosq is None:
            raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
        from tests.tlsca import make_ca, make_server_cert

        ca = make_ca(workdir / "ca")
        server_cert = make_server_cert(ca, workdir / "server-cert")
        tls_port = free_port()
        while tls_port == port:
            tls_port = free_port()
        conf = write_production_conf(workdir, port=port, tls_port=tls_port, ca=ca.cert_path,
                                     cert=server_cert.cert_path, key=server_cert.key_path)
        os.chmod(workdir / "acl", 0o600)
        os.chmod(passwd, 0o600)
        proc = Process("broker-mosquitto", [mosq, "-c", str(conf)], workdir)
    else:
        raise ValueError(kind)
    wait_for(lambda: port_open(port) or not proc.alive(), 20, f"{kind} broker on {port}")
    if not proc.alive():
        raise RuntimeError(f"{kind} broker exited:\n{proc.log_tail()}")
    return proc, port


def _server_toml(cfg: dict[str, Any]) -> str:
    """The server config as TOML (flat keys first, then one table per section)."""
    lines: list[str] = []
    tables: list[str] = []
    for key, value in cfg.items():
        if isinstance(value, dict):
            tables.append(f"\n[{key}]")
            tables.extend(f"{k} = {json.dumps(v)}" for k, v in value.items())
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines + tables) + "\n"


# ------------------------------------------------------------------ devices

class LineProc:
    """A `python -m <module>` subprocess driven by JSON lines on stdin, answering one
    JSON line per command on stdout (bench.device, bench.simdevices)."""

    def __init__(self, name: str, module: str, log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self._log, cwd=REPO, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, cmd: str, **args: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        self.proc.stdin.flush()

    def recv(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} died:\n{self.log_tail()}")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"{self.name}: {reply['error']}\n{self.log_tail()}")
        return reply

    def call(self, cmd: str, **args: Any) -> dict[str, Any]:
        self.send(cmd, **args)
        return self.recv()

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.call("stop")
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class DeviceProc(LineProc):
    """A `python -m bench.device` subprocess: one agent and its daemon."""

    def __init__(self, name: str, config: dict[str, Any], workdir: Path) -> None:
        super().__init__(f"device {name}", "bench.device", workdir / f"device-{name}.log")
        self.call("init", config=config)


def call_all(devices: Sequence[LineProc], cmd: str, **args: Any) -> list[dict[str, Any]]:
    """Send `cmd` to every device at once, then collect the answers."""
    for dev in devices:
        dev.send(cmd, **args)
    return [dev.recv() for dev in devices]


# ------------------------------------------------------------------ the fleet

class Fleet:
    """Broker + merge server(s) + registered devices in one temporary directory.

    `store`: the servers' `[store]` table (default: LMDB in each server's directory;
    `{"kind": "postgres", "url": ...}` for one database shared by every server).
    """

    def __init__(self, broker: str, workdir: Path, devices: dict[str, list[str]], *,
                 server_settings: dict[str, Any] | None = None,
                 sync_settings: dict[str, Any] | None = None,
                 store: dict[str, Any] | None = None) -> None:
        self.kind = broker
        self.dir = workdir
        self.devices = dict(devices)
        self.server_settings = server_settings or {}
        self.sync_settings = sync_settings or {}
        self.store_settings = dict(store) if store else {"map_size_mb": 1024}
        self.passwords = {user: secrets.token_urlsafe(12)
                          for user in (*devices, SERVER_USER, PROBE, RAW_DEVICE)}
        self.broker: Process | None = None
        self.servers: list[Process] = []
        self.metrics_ports: list[int] = []
        self.port = 0
        self._devices: list[DeviceProc] = []

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start_broker(self) -> int:
        self.broker, self.port = start_broker(self.kind, self.dir / "broker", self.passwords)
        return self.port

    # -------------------------------------------------------------- server(s)

    @property
    def server(self) -> Process | None:
        """The first merge server (the only one unless `start_servers(n > 1)`)."""
        return self.servers[0] if self.servers else None

    @property
    def shared_store(self) -> bool:
        return self.store_settings.get("kind") == "postgres"

    def server_config(self, index: int = 0, metrics_port: int | None = None
                      ) -> dict[str, Any]:
        merge = dict(self.server_settings.get("merge", {}))
        suffix = "" if index == 0 else f"-{index + 1}"
        cfg: dict[str, Any] = {
            "server_id": f"bench{suffix}", "data_dir": str(self.dir / f"server{suffix}"),
            "shared_group": "waystation" if self.kind == "mosquitto" else False,
            "store": dict(self.store_settings),
            "mqtt": {"host": "127.0.0.1", "port": self.port,
                     "password": self.passwords[SERVER_USER]},
            "merge": merge,
            "log": {"level": "warning"},
        }
        if metrics_port is not None:
            cfg["metrics_port"] = metrics_port
        return cfg

    def open_server_store(self) -> Any:
        from broker.server.store import open_store
        from waystation.config import ServerConfig

        return open_store(ServerConfig.model_validate(self.server_config()))

    def register_devices(self) -> None:
        """Register every device (and the readiness probe) in the server store."""
        from broker.server import registry

        store = self.open_server_store()
        try:
            known = {row.id for row in registry.list_devices(store)}
            now = time.time_ns() // 1_000_000
            for dev, scopes in {**self.devices, PROBE: ["probe"]}.items():
                if dev not in known:
                    registry.add_device(store, dev, scopes, now)
        finally:
            store.close()

    def start_server(self) -> None:
        self.start_servers(1)

    def start_servers(self, count: int) -> None:
        """Start `count` merge servers (`waystation server run`) and wait until every
        one of them consumes from the broker. More than one needs the PostgreSQL store
        (LMDB is one server's own store) and a broker with shared subscriptions."""
        if self.servers:
            raise RuntimeError("servers already running")
        if count > 1 and not (self.shared_store and self.kind in ("mosquitto", "rabbitmq")):
            raise ValueError("several servers need store kind postgres and Mosquitto "
                             "(shared subscription) or RabbitMQ (AMQP intake)")
        self.register_devices()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for index in range(count):
            port = free_port()
            conf = self.dir / f"server{'' if index == 0 else f'-{index + 1}'}.toml"
            conf.write_text(_server_toml(self.server_config(index, port)))
            name = "server" if index == 0 else f"server-{index + 1}"
            self.servers.append(Process(name, [str(Path(sys.executable).parent / "waystation"),
                                               "server", "run", "--config", str(conf)],
                                        self.dir, env=env))
            self.metrics_ports.append(port)
        self._wait_servers_ready()

    def scrape(self, index: int = 0) -> dict[str, float]:
        """The metrics endpoint of server `index`: {'name{labels}': value}."""
        return scrape_metrics(self.metrics_ports[index])

    def _wait_servers_ready(self, timeout: float = 30.0) -> None:
        """Probe catch-ups until every server has consumed at least one message: the
        shared subscription hands each probe to one of them, so this also proves that
        every server's subscription is in place."""
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        def consumed(index: int) -> bool:
            try:
                return self.scrape(index).get(
                    'waystation_server_messages_total{direction="in"}', 0) > 0
            except OSError:
                return False

        client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                             client_id=PROBE, clean_session=True)
        client.username_pw_set(PROBE, self.passwords[PROBE])
        client.on_connect = lambda c, u, f, r, p: c.subscribe(f"{PREFIX}/{PROBE}/down", 1)
        client.connect("127.0.0.1", self.port)
        client.loop_start()
        try:
            deadline = time.monotonic() + timeout
            waiting = set(range(len(self.servers)))
            while waiting:
                for index in list(waiting):
                    proc = self.servers[index]
                    if not proc.alive():
                        raise RuntimeError(f"{proc.name} exited:\n{proc.log_tail()}")
                    if consumed(index):
                        waiting.discard(index)
                if not waiting:
                    break
                if time.monotonic() > deadline:
                    tails = "\n".join(self.servers[i].log_tail() for i in waiting)
                    raise TimeoutError(f"servers {sorted(waiting)} not consuming:\n{tails}")
                req = json.dumps({"type": "catchup", "v": 1, "dev": PROBE, "req": "probe",
                                  "cp": {}}).encode()
                client.publish(f"{PREFIX}/{PROBE}/up", req, qos=1)
                time.sleep(0.1)
        finally:
            client.disconnect()
            client.loop_stop()

    def stop_server(self) -> None:
        """Stop every merge server."""
        for proc in self.servers:
            proc.stop()
        self.servers.clear()
        self.metrics_ports.clear()

    # -------------------------------------------------------------- devices

    def agent_config(self, dev: str, data_dir: Path, *, port: int | None = None,
                     sync: dict[str, Any] | None = None) -> dict[str, Any]:
        return {
            "device_id": dev, "data_dir": str(data_dir), "scopes": self.devices[dev],
            "mqtt": {"host": "127.0.0.1", "port": port or self.port,
                     "password": self.passwords[dev]},
            "sync": {**self.sync_settings, **(sync or {})},
            "log": {"level": "warning"},
        }

    def device(self, dev: str, data_dir: Path | None = None, *, port: int | None = None,
               sync: dict[str, Any] | None = None) -> DeviceProc:
        data = data_dir or self.dir / "devices" / dev
        proc = DeviceProc(dev, self.agent_config(dev, data, port=port, sync=sync), self.dir)
        self._devices.append(proc)
        return proc

    def close_device(self, proc: DeviceProc) -> None:
        proc.close()
        if proc in self._devices:
            self._devices.remove(proc)

    def stop(self) -> None:
        for proc in self._devices:
            with contextlib.suppress(Exception):
                proc.close()
        self._devices.clear()
        self.stop_server()
        if self.broker is not None:
            self.broker.stop()
            self.broker = None


# ------------------------------------------------------------------ byte-counting proxy

class CountingProxy:
    """A TCP proxy on 127.0.0.1 that counts the bytes in each direction: what the agent
    sends (`up`) and receives (`down`), MQTT framing, PUBACKs and pings included (TCP and
    IP headers are not in these counts). One thread, non-blocking sockets."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.up = 0
        self.down = 0
        self.connections = 0
        self._lsock = socket.socket()
        self._lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._lsock.bind(("127.0.0.1", 0))
        self._lsock.listen(16)
        self._lsock.setblocking(False)
        self.port = int(self._lsock.getsockname()[1])
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._lsock, selectors.EVENT_READ, None)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="proxy", daemon=True)
        self._thread.start()

    def reset(self) -> None:
        with self._lock:
            self.up = self.down = 0

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return self.up, self.down

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for key in list(self._sel.get_map().values()):
            with contextlib.suppress(OSError):
                key.fileobj.close()  # type: ignore[union-attr]
        self._sel.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._sel.select(0.1):
                if key.data is None:
                    self._accept()
                else:
                    self._pump(key.fileobj, *key.data)  # type: ignore[arg-type]

    def _accept(self) -> None:
        client, _ = self._lsock.accept()
        upstream = socket.create_connection(("127.0.0.1", self.target))
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
        self.connections += 1
        self._sel.register(client, selectors.EVENT_READ, (upstream, "up"))
        self._sel.register(upstream, selectors.EVENT_READ, (client, "down"))

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        try:
            data = src.recv(262144)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            for sock in (src, dst):
                with contextlib.suppress(Exception):
                    self._sel.unregister(sock)
                sock.close()
            return
        with self._lock:
            if direction == "up":
                self.up += len(data)
            else:
                self.down += len(data)
        dst.setblocking(True)
        try:
            dst.sendall(data)
        except OSError:
            pass
        finally:
            dst.setblocking(False)


def copy_tree(src: Path, dst: Path) -> Path:
    """Copy a device's data directory (a prepared outbox) for another run."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


@contextlib.contextmanager
def workdir(prefix: str, keep: bool = False) -> Iterator[Path]:
    import tempfile

    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)
        else:
            print(f"(kept {path})")
