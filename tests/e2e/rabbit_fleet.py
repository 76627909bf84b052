"""The e2e Fleet on a three-node RabbitMQ cluster: devices over MQTT through a balancer,
merge servers over AMQP (`[amqp] nodes`), one PostgreSQL store (or, with one server,
LMDB: `pg_url=None`).

    fleet = RabbitFleet(tmp_path, cluster, pg_url)   # cluster: tests.rabbitmq_cluster
    fleet.start()                                    # balancer, server-1
    fleet.add_server("server-2", node_order=[1, 2, 0]); fleet.start_server("server-2")
    fleet.add_device(...); fleet.start_agent(...)    # as tests.e2e.fleet.Fleet

Devices reach the cluster as they would in production: through one address in front
of the nodes (a TCP balancer here, HAProxy or DNS in a real deployment) that hands
each new connection to the next node that is up, so devices spread over the three
nodes and one whose node died reconnects to another. Logins are the real RabbitMQ
users and permissions of broker.rabbitmq.definitions, imported with rabbitmqctl
before an agent first starts. Everything else (registry through `waystation device
add`, agents, servers, the store, convergence checks) is the Fleet's.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections import Counter
from pathlib import Path

from broker.rabbitmq.definitions import definitions
from tests.e2e.fleet import SERVER_USER, Fleet, Proc, waystation_argv
from tests.helpers import free_port
from tests.rabbitmq_cluster import RabbitCluster

__all__ = ["NodeBalancer", "RabbitFleet"]

PREFIX = "waystation"


class NodeBalancer:
    """A TCP balancer on 127.0.0.1: each connection goes to the next live node."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.port = free_port()
        self.chosen: Counter[int] = Counter()
        """Connections handed to each node (by index), ever."""
        self._next = 0
        self._sock = socket.create_server(("127.0.0.1", self.port))
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="balancer", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closing.set()
        with contextlib.suppress(OSError):
            self._sock.close()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = None
        for _ in range(len(self.ports)):
            index = self._next % len(self.ports)
            self._next += 1
            try:
                upstream = socket.create_connection(("127.0.0.1", self.ports[index]), timeout=2)
            except OSError:
                continue
            self.chosen[index] += 1
            break
        if upstream is None:
            client.close()
            return
        upstream.settimeout(None)
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_pump, args=(upstream, client), daemon=True).start()
        _pump(client, upstream)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()


class RabbitFleet(Fleet):
    """Fleet whose broker is a RabbitMQ cluster (see module docstring)."""

    def __init__(self, root: Path, cluster: RabbitCluster, pg_url: str | None, *,
                 metrics: bool = True) -> None:
        """`pg_url` None: the server keeps an LMDB store (one server, e.g. a test whose
        server runs in a network namespace of its own and reaches nothing but AMQP)."""
        self.cluster = cluster
        self.balancer = NodeBalancer([n.mqtt_port for n in cluster.nodes])
        self.node_orders: dict[str, list[int]] = {"server-1": [0, 1, 2]}
        self._unsynced: dict[str, str] = {}
        super().__init__(root, "embedded", "lmdb" if pg_url is None else "postgres", pg_url,
                         metrics=metrics)
        self.kind = "rabbitmq"  # type: ignore[assignment]

    # -------------------------------------------------------------- overrides

    def _prepare_broker(self) -> None:
        self.broker_dir.mkdir(parents=True, exist_ok=True)
        self.password_file.touch()
        self.broker_config = None
        self.broker = None
        self.port = self.balancer.port

    def _write_server_config(self, server_id: str) -> None:
        super()._write_server_config(server_id)
        path = self.server_configs[server_id]
        text = path.read_text().replace("shared_group = false\n", "")
        order = self.node_orders.get(server_id, [0, 1, 2])
        nodes = [f"127.0.0.1:{self.cluster.amqp_port(i)}" for i in order]
        text = text.replace("[mqtt]\n", f"[amqp]\nnodes = {json.dumps(nodes)}\n"
                                        "prefetch = 500\n[mqtt]\n")
        path.write_text(text)

    def _reload_logins(self, user: str, password: str) -> None:
        self._unsynced[user] = password

    def sync_logins(self) -> None:
        """Import the logins added since the last import into RabbitMQ (one rabbitmqctl)."""
        if not self._unsynced:
            return
        servers = {u: p for u, p in self._unsynced.items() if u == SERVER_USER}
        devices = {u: p for u, p in self._unsynced.items() if u != SERVER_USER}
        self.cluster.import_definitions(definitions(prefix=PREFIX, server_users=servers,
                                                    devices=devices))
        self._unsynced.clear()

    def start_broker(self) -> None:
        self.sync_logins()

    def start_server(self, server_id: str = "server-1", **kw: object) -> Proc:
        self.sync_logins()
        return super().start_server(server_id, **kw)  # type: ignore[arg-type]

    def start_agent(self, dev: str, *, wait: bool = True) -> Proc:
        self.sync_logins()
        return super().start_agent(dev, wait=wait)

    def add_server(self, server_id: str, node_order: list[int] | None = None) -> Proc:
        """Another merge server on the same database and up queue, trying the nodes in
        `node_order` (so servers start on different nodes)."""
        if server_id in self.servers:
            raise ValueError(f"{server_id} exists already")
        self.node_orders[server_id] = node_order or [0, 1, 2]
        self.server_configs[server_id] = self.root / f"{server_id}.toml"
        self._write_server_config(server_id)
        proc = Proc(server_id, waystation_argv("server", "run", "--config",
                                               str(self.server_configs[server_id])),
                    self.logs_dir / f"{server_id}.log", self.root)
        self.servers[server_id] = proc
        return proc

    def broker_log_tail(self, lines: int = 40) -> str:
        return self.cluster.log_tails(lines)

    def close(self, *, check: bool = True) -> None:
        super().close(check=check)
        self.balancer.close()
