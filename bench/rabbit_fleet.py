"""The benchmark Fleet (bench/fleet.py) on a three-node RabbitMQ cluster (bench.scale_rabbit).

    cluster = RabbitCluster(tmp / "rabbit").start()     # tests/rabbitmq_cluster.py
    fleet = RabbitBenchFleet(tmp / "run-1", cluster, devices, store={"kind": "postgres", ...},
                             passwords=passwords, run_id="r1")
    fleet.start_broker()          # nothing to start: points the probe at node 0
    fleet.start_servers(3)        # `waystation server run` with `[amqp] nodes`, as deployed

The cluster and its logins are started once per benchmark (starting three Erlang VMs
and importing 10,000 users takes a while); each Fleet is one run on it: its own
registered devices, database and merge servers. The servers are configured as
deploy/README.md's RabbitMQ section says: `[amqp] nodes` (each server lists the nodes
starting at a different one, so the servers spread over the nodes), `prefetch`, no
`shared_group`; their `[mqtt]` login is the AMQP login.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

from bench.fleet import PREFIX, PROBE, SERVER_USER, Fleet, process_table
from broker.rabbitmq.definitions import definitions, up_queue_name
from tests.rabbitmq_cluster import RabbitCluster

__all__ = ["RabbitBenchFleet", "cluster_definitions", "import_definitions", "node_memory",
           "nodes_cpu_s", "purge_up_queue"]

PREFETCH = 2000
"""deploy/README.md's `[amqp] prefetch` example."""


def cluster_definitions(passwords: dict[str, str], *, bindings: bool = True
                        ) -> dict[str, Any]:
    """Every login in `passwords` (the server user included) with the design's ACL,
    queues and policies. `bindings=False` leaves the shared up queue unbound, so raw
    MQTT traffic measured before the servers run does not pile up in it."""
    servers = {u: p for u, p in passwords.items() if u == SERVER_USER}
    devices = {u: p for u, p in passwords.items() if u != SERVER_USER}
    doc = definitions(prefix=PREFIX, server_users=servers, devices=devices)
    if not bindings:
        doc["bindings"] = []
    return doc


def import_definitions(cluster: RabbitCluster, doc: dict[str, Any],
                       timeout: float = 1800.0) -> None:
    """`rabbitmqctl import_definitions` with a timeout for 10,000 users (RabbitCluster's
    own waits 60 s: minutes here, as every user's permissions are written)."""
    index = next(i for i, n in enumerate(cluster.nodes) if n.running)
    path = cluster.workdir / f"definitions-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(doc))
    cluster.ctl(index, "import_definitions", str(path), timeout=timeout)


def purge_up_queue(cluster: RabbitCluster) -> None:
    """Empty the shared up queue between runs (messages of an earlier run's devices)."""
    index = next(i for i, n in enumerate(cluster.nodes) if n.running)
    with contextlib.suppress(RuntimeError):
        cluster.ctl(index, "purge_queue", up_queue_name(PREFIX))


def _tree(root: int, table: dict[int, tuple[int, float]]) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def _rss(pid: int) -> int:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def node_memory(cluster: RabbitCluster) -> list[float]:
    """RSS in MiB of each node's process tree (the Erlang VM and its helpers)."""
    table = process_table()
    return [sum(_rss(p) for p in _tree(n.proc.pid, table)) / 2**20
            if n.proc is not None and n.running else 0.0 for n in cluster.nodes]


def nodes_cpu_s(cluster: RabbitCluster) -> list[float]:
    """CPU seconds used so far by each node's process tree."""
    table = process_table()
    return [sum(table.get(p, (0, 0.0))[1] for p in _tree(n.proc.pid, table))
            if n.proc is not None else 0.0 for n in cluster.nodes]


class RabbitBenchFleet(Fleet):
    """A Fleet whose broker is the (already running) cluster; see the module docstring."""

    def __init__(self, workdir: Path, cluster: RabbitCluster, devices: dict[str, list[str]],
                 *, store: dict[str, Any], passwords: dict[str, str], run_id: str) -> None:
        super().__init__("rabbitmq", workdir, devices, store=store)
        self.cluster = cluster
        self.passwords = passwords
        self.run_id = run_id

    def start_broker(self) -> int:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = self.cluster.mqtt_port(0)
        return self.port

    def server_config(self, index: int = 0, metrics_port: int | None = None
                      ) -> dict[str, Any]:
        cfg = super().server_config(index, metrics_port)
        cfg.pop("shared_group", None)  # must not be set with [amqp] (deploy/README.md)
        cfg["server_id"] = f"{self.run_id}-{index + 1}"
        size = len(self.cluster.nodes)
        order = [(index + k) % size for k in range(size)]
        cfg["amqp"] = {"nodes": [f"127.0.0.1:{self.cluster.amqp_port(i)}" for i in order],
                       "prefetch": PREFETCH}
        cfg["mqtt"]["port"] = self.cluster.mqtt_port(order[0])
        return cfg

    def register_devices(self) -> None:
        """Every device of this run (and the readiness probe) in one transaction:
        10,000 `registry.add_device` calls would each be a transaction of their own."""
        from broker.server.store.base import DeviceRow

        now = time.time_ns() // 1_000_000
        rows = [DeviceRow(dev, tuple(scopes), created_ms=now)
                for dev, scopes in {**self.devices, PROBE: ["probe"]}.items()]

        def register(txn: Any) -> None:
            for row in rows:
                if txn.get_device(row.id) is None:
                    txn.put_device(row)
            txn.bump_registry()

        store = self.open_server_store()
        try:
            store.transact(register)
        finally:
            store.close()

    def _wait_servers_ready(self, timeout: float = 300.0) -> None:
        # a busy cluster takes minutes to declare a server's queues (Mnesia bindings)
        super()._wait_servers_ready(timeout)

    def server_pids(self) -> list[int]:
        return [p.pid for p in self.servers]


def raise_nofile() -> int:
    """RLIMIT_NOFILE to the hard limit (inherited by the nodes, servers and swarms)."""
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def load_average() -> list[float]:
    return list(os.getloadavg())
