"""bench.rabbit_fleet: the servers the RabbitMQ benchmark starts are configured as
deploy/README.md's RabbitMQ section says, and the raw phase's definitions leave the
shared up queue unbound (so raw traffic cannot reach the merge servers later)."""

from __future__ import annotations

from pathlib import Path

from bench.fleet import SERVER_USER
from bench.rabbit_fleet import PREFETCH, RabbitBenchFleet, cluster_definitions
from broker.rabbitmq.definitions import up_queue_name
from tests.rabbitmq_cluster import RabbitCluster
from waystation.config import ServerConfig


def test_server_config_is_the_documented_amqp_intake(tmp_path: Path) -> None:
    cluster = RabbitCluster(tmp_path / "rabbit")  # not started: names and ports only
    passwords = {SERVER_USER: "pw-server", "dev-1": "pw-1"}
    fleet = RabbitBenchFleet(tmp_path / "run", cluster, {"dev-1": ["route-0"]},
                             store={"kind": "postgres", "url": "postgresql://x/y"},
                             passwords=passwords, run_id="thr2")
    amqp = [f"127.0.0.1:{n.amqp_port}" for n in cluster.nodes]
    for index in range(3):
        raw = fleet.server_config(index, metrics_port=9100 + index)
        assert "shared_group" not in raw
        cfg = ServerConfig.model_validate(raw)
        assert cfg.server_id == f"thr2-{index + 1}"
        assert cfg.amqp.enabled and cfg.amqp.prefetch == PREFETCH
        # each server starts on another node, then tries the others in turn
        assert cfg.amqp.nodes == amqp[index:] + amqp[:index]
        assert cfg.mqtt.port == cluster.nodes[index].mqtt_port
    # one database for all of them
    assert fleet.server_config(0)["store"] == fleet.server_config(2)["store"]


def test_raw_phase_definitions_leave_the_up_queue_unbound() -> None:
    passwords = {SERVER_USER: "pw-server", "dev-1": "pw-1", "dev-2": "pw-2"}
    raw = cluster_definitions(passwords, bindings=False)
    full = cluster_definitions(passwords)
    assert raw["bindings"] == []
    assert [b["destination"] for b in full["bindings"]] == [up_queue_name("waystation")]
    assert {u["name"] for u in raw["users"]} == set(passwords)
    assert raw["permissions"] == full["permissions"]  # the same ACL in both imports
    # the bindings-only import after the raw phase carries no logins
    assert cluster_definitions({})["users"] == []
