"""A three-node RabbitMQ cluster on this machine, from the shipped config, for tests and benches.

    cluster = RabbitCluster(workdir)         # deploy/rabbitmq/rabbitmq.conf, ports rewritten
    cluster.start()                          # three nodes, one cluster (classic_config)
    cluster.import_definitions(doc)          # broker.rabbitmq.definitions(...)
    cluster.mqtt_port(0), cluster.amqp_port(2)
    cluster.kill(1)                          # SIGKILL the node's Erlang VM (kill -9)
    cluster.start_node(1)                    # it rejoins the cluster
    cluster.stop()

Each node has its own name (`ws<tag>-<i>@localhost`), ports, data and log directories
and Erlang distribution port; the cluster has its own cookie and its own epmd (on a
port of its own, started with the first node and ended by `stop()`), so nothing here
touches a RabbitMQ the machine runs for itself. The nodes run from Debian's
`rabbitmq-server` package (`/usr/lib/rabbitmq/bin`) as the current user.

`rabbitmqctl` calls cost a second or two each (an Erlang VM starts): use
`import_definitions` for many users at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from tests.helpers import free_port, port_open, wait_until

__all__ = ["RABBITMQ_BIN", "RabbitCluster", "RabbitNode", "rabbitmq_unavailable",
           "running_cluster", "start_cluster_or_fail"]

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "deploy" / "rabbitmq" / "rabbitmq.conf"
PLUGINS = REPO / "deploy" / "rabbitmq" / "enabled_plugins"
RABBITMQ_BIN = Path(os.environ.get("WAYSTATION_RABBITMQ_BIN", "/usr/lib/rabbitmq/bin"))
START_TIMEOUT_S = 120.0
RESTART_WAIT_S = 60.0


def rabbitmq_unavailable() -> str | None:
    """Why a RabbitMQ cluster cannot run here (None when it can)."""
    if not (RABBITMQ_BIN / "rabbitmq-server").exists():
        return (f"RabbitMQ is not installed ({RABBITMQ_BIN}/rabbitmq-server missing): "
                "apt-get install rabbitmq-server (scripts/test.sh does)")
    plugins = list(Path("/usr/lib/rabbitmq/lib").glob("rabbitmq_server-*/plugins/rabbitmq_mqtt-*"))
    if not plugins:
        return "RabbitMQ's MQTT plugin is missing (rabbitmq_mqtt)"
    return None


def render_conf(text: str, *, nodes: list[str], amqp_port: int, mqtt_port: int) -> str:
    """The shipped config with node names and listener ports rewritten, nothing else.

    Every rewritten key must occur exactly once (AssertionError otherwise, so a changed
    config fails loudly here rather than running something else than what ships)."""
    rewrites = {
        "listeners.tcp.default": f"127.0.0.1:{amqp_port}",
        "mqtt.listeners.tcp.default": f"127.0.0.1:{mqtt_port}",
        # the test machine's /tmp may have less free space than a broker host
        "disk_free_limit.absolute": "50MB",
    }
    for i, node in enumerate(nodes, 1):
        rewrites[f"cluster_formation.classic_config.nodes.{i}"] = node
    seen = dict.fromkeys(rewrites, 0)
    out = []
    for line in text.splitlines():
        key = line.split("=", 1)[0].strip()
        if not line.lstrip().startswith("#") and key in rewrites:
            seen[key] += 1
            line = f"{key} = {rewrites[key]}"
        out.append(line)
    assert all(count == 1 for count in seen.values()), seen
    return "\n".join(out) + "\n"


class RabbitNode:
    """One node of the cluster (its VM is a subprocess of ours)."""

    def __init__(self, cluster: RabbitCluster, index: int) -> None:
        self.cluster = cluster
        self.index = index
        self.name = f"ws{cluster.tag}-{index + 1}@localhost"
        self.dir = cluster.workdir / f"node-{index + 1}"
        self.amqp_port = free_port()
        self.mqtt_port = free_port()
        self.dist_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def ready(self) -> bool:
        """Running and listening (a node still booting, or hung booting, is not)."""
        return self.running and port_open("127.0.0.1", self.mqtt_port) \
            and port_open("127.0.0.1", self.amqp_port)

    def env(self) -> dict[str, str]:
        env = self.cluster.base_env()
        env.update({
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_PID_FILE": str(self.dir / "pid"),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.dir / "advanced.config"),
        })
        return env

    def write_config(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "rabbitmq.conf").write_text(render_conf(
            CONF.read_text(), nodes=[n.name for n in self.cluster.nodes],
            amqp_port=self.amqp_port, mqtt_port=self.mqtt_port))
        shutil.copyfile(PLUGINS, self.dir / "enabled_plugins")

    def start(self) -> None:
        assert not self.running, f"{self.name} already runs"
        self.write_config()
        with (self.dir / "console.log").open("ab") as log:
            self.proc = subprocess.Popen([str(RABBITMQ_BIN / "rabbitmq-server")],
                                         env=self.env(), stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        wait_until(lambda: (not self.running) or (port_open("127.0.0.1", self.mqtt_port)
                                                  and port_open("127.0.0.1", self.amqp_port)),
                   timeout, interval=0.2, message=lambda: f"{self.name} listening\n"
                                                          f"{self.log_tail()}")
        if not self.running:
            raise AssertionError(f"{self.name} exited at start:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL the whole process group (the VM, erl_child_setup, inet_gethost)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        wait_until(lambda: not port_open("127.0.0.1", self.mqtt_port), 30,
                   message=f"{self.name} MQTT port closed")

    def stop(self) -> None:
        """Stop gracefully (SIGTERM), SIGKILL after a while."""
        self.terminate()
        self.wait_stopped()

    def terminate(self) -> None:
        """Ask the node to stop (SIGTERM to its process group); `wait_stopped` waits."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)

    def wait_stopped(self) -> None:
        """Wait for a node asked to stop; SIGKILL it after a minute."""
        if self.proc is None:
            return
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_tail(self, lines: int = 30) -> str:
        text = ""
        for path in [self.dir / "console.log", self.dir / "log" / f"{self.name}.log"]:
            with contextlib.suppress(OSError):
                text += f"--- {path.name}\n" + "\n".join(
                    path.read_text(errors="replace").splitlines()[-lines:]) + "\n"
        return text or "(no log)"


class RabbitCluster:
    """Three (or `size`) clustered nodes with their own epmd and cookie."""

    def __init__(self, workdir: Path, size: int = 3) -> None:
        self.workdir = workdir
        self.tag = secrets.token_hex(3)
        self.cookie = secrets.token_hex(16).upper()
        self.epmd_port = free_port()
        self.home = workdir / "home"
        self.nodes = [RabbitNode(self, i) for i in range(size)]

    def base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RABBITMQ_", "ERL_", "WAYSTATION_"))}
        env.update({
            "HOME": str(self.home),
            "RABBITMQ_CONF_ENV_FILE": "/dev/null",  # not /etc/rabbitmq/rabbitmq-env.conf
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS":
                "-kernel inet_dist_use_interface {127,0,0,1}",
            "RABBITMQ_CTL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        })
        return env

    def start(self) -> RabbitCluster:
        self.home.mkdir(parents=True, exist_ok=True)
        cookie = self.home / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(self.cookie)
            cookie.chmod(0o400)
        # The first node alone, then the others join it: started all at once they race
        # to form the cluster, and one may pause itself as a minority (pause_minority)
        # just when the tests begin.
        self.nodes[0].start()
        self.nodes[0].wait_ready()
        for node in self.nodes[1:]:
            node.start()
        for node in self.nodes[1:]:
            node.wait_ready()
        everyone = {n.name for n in self.nodes}
        for i in range(len(self.nodes)):
            wait_until(lambda i=i: self.running_nodes(i) == everyone,  # type: ignore[misc]
                       START_TIMEOUT_S, interval=1.0,
                       message=lambda: f"cluster formed: {self.ctl(0, 'cluster_status')}")
        for node in self.nodes:
            node.wait_ready()
        return self

    def start_node(self, index: int) -> None:
        """(Re)start one node and wait until it runs in the cluster again.

        A node restarted after a SIGKILL can hang in its boot without ever listening
        (seen once in CI: >2 min, under load, where it takes ~1 s). That is RabbitMQ's
        boot, not what the tests are about, so after `RESTART_WAIT_S` it is killed and
        booted once more (its log so far printed); a second hang fails the test."""
        node = self.nodes[index]
        for attempt in (1, 2):
            node.start()
            try:
                node.wait_ready(RESTART_WAIT_S if attempt == 1 else START_TIMEOUT_S)
                break
            except AssertionError as err:
                if attempt == 2 or not node.running:
                    raise
                print(f"{node.name} did not come back within {RESTART_WAIT_S} s; "
                      f"killed and started again. Its first boot:\n{err}")
                node.kill()
        other = next(i for i, n in enumerate(self.nodes) if i != index and n.running)
        wait_until(lambda: node.name in self.running_nodes(other), START_TIMEOUT_S,
                   interval=1.0, message=f"{node.name} back in the cluster")

    def kill(self, index: int) -> None:
        self.nodes[index].kill()

    def ensure_ready(self) -> None:
        """Every node running and listening: the down ones started, a hung one restarted
        (what a test left behind must not become the next test's failure)."""
        for i, node in enumerate(self.nodes):
            if node.running and not node.ready:
                node.kill()
            if not node.running:
                self.start_node(i)

    def stop(self) -> None:
        # All at once (the cluster is being thrown away, nothing to hand over): a few
        # seconds less than one after the other.
        for node in self.nodes:
            node.terminate()
        for node in self.nodes:
            node.wait_stopped()
        # the epmd our first node started (daemonized, so not our child any more)
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(["epmd", "-port", str(self.epmd_port), "-kill"],
                           env=self.base_env(), capture_output=True, timeout=10)

    def mqtt_port(self, index: int) -> int:
        return self.nodes[index].mqtt_port

    def amqp_port(self, index: int) -> int:
        return self.nodes[index].amqp_port

    def ctl(self, index: int, *args: str, timeout: float = 60.0,
            stdin: str | None = None) -> str:
        """`rabbitmqctl -n <node> args...`; raises with its output when it fails."""
        argv = [str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.nodes[index].name, *args]
        res = subprocess.run(argv, env=self.base_env(), capture_output=True, text=True,
                             timeout=timeout, input=stdin)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[1:])} failed ({res.returncode}):\n"
                               f"{res.stdout}{res.stderr}")
        return res.stdout

    def running_nodes(self, index: int) -> set[str]:
        try:
            out = self.ctl(index, "cluster_status", "--formatter", "json", timeout=30)
        except (RuntimeError, subprocess.TimeoutExpired):
            return set()
        return set(json.loads(out).get("running_nodes", []))

    def import_definitions(self, doc: Mapping[str, Any], index: int | None = None) -> None:
        if index is None:
            index = next(i for i, n in enumerate(self.nodes) if n.running)
        path = self.workdir / f"definitions-{time.monotonic_ns()}.json"
        path.write_text(json.dumps(doc))
        self.ctl(index, "import_definitions", str(path))

    def log_tails(self, lines: int = 30) -> str:
        return "\n".join(node.log_tail(lines) for node in self.nodes)


def start_cluster_or_fail(workdir: Path, size: int = 3) -> RabbitCluster:
    """Start a cluster; a test that needs one fails (never skips) when RabbitMQ is missing:
    scripts/test.sh installs it, so a missing server is a broken setup, not an option.
    `size=1`: one node, for tests of what does not depend on clustering (much cheaper)."""
    import pytest

    reason = rabbitmq_unavailable()
    if reason is not None:
        pytest.fail(reason, pytrace=False)
    cluster = RabbitCluster(workdir, size)
    try:
        cluster.start()
    except BaseException:
        print(cluster.log_tails(40))
        cluster.stop()
        raise
    return cluster


def running_cluster(workdir: Path, size: int = 3) -> Iterator[RabbitCluster]:
    """A started cluster (`start_cluster_or_fail`) for a fixture to `yield from`, stopped
    when the fixture ends."""
    cluster = start_cluster_or_fail(workdir, size)
    try:
        yield cluster
    finally:
        cluster.stop()
