"""Prometheus metrics of a running merge server (`metrics_port` in the server config).

A scrape reads only counters the server already keeps in memory: it never touches the
store (whose connection belongs to the worker thread) and never blocks the worker.

    waystation_server_changes_total{outcome}   applied / duplicate / rejected / transient
    waystation_server_conflicts_total          conflict-log entries written
    waystation_server_dead_letters_total       bad input kept for the operator
    waystation_server_catchup_records_total    record states sent in catch-up pages
    waystation_server_missed_nudges_total      devices shown the gap of the deltas they
                                               missed while counted offline, back online
                                               without reconnecting (broker.server.missed)
    waystation_server_schema_redos_total       groups and catch-up reads run again: a
                                               schema publish / rollback (or a registry
                                               change) committed under them
    waystation_server_messages_total{direction} up messages handled / down messages sent
    waystation_server_groups_total             store transactions (groups of messages)
    waystation_server_group_seconds_total      time spent handling groups
    waystation_server_devices{state}           registered / online
    waystation_server_inbox_messages           messages waiting for the worker
    waystation_server_broker_connected         1 while connected to the broker
    waystation_server_announce_connected       over AMQP: 1 while its announcement link
                                               to RabbitMQ's MQTT listener is up (absent
                                               over MQTT: the broker link announces)

The intake (broker.server.intake) and the dead letters' bounds:

    waystation_server_intake_bytes{state}      waiting / peak (since start) / limit
    waystation_server_intake_devices           devices with messages waiting
    waystation_server_intake_messages_total{outcome}  queued / refused_too_large /
                                               dropped_over_quota
    waystation_server_intake_dropped_bytes_total  payload bytes of the dropped messages
    waystation_server_intake_waits_total       times the network thread waited for room
    waystation_server_intake_wait_seconds_total   and for how long (backpressure)
    waystation_server_dead_letters_counted_total  refusals only counted in a summary
                                               letter (not kept one by one)
    waystation_server_dead_letters_stored{what}   count / bytes / truncated kept in the
                                               store (as of the last trim, ~1 min)
    waystation_server_dead_letters_dropped_total  letters the store's bounds dropped
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from broker.server.metrics_http import MetricsHttpServer


class MetricsSource(Protocol):
    def metrics_snapshot(self) -> dict[str, Any]: ...


class ServerCollector(Collector):
    """Turns `MergeServer.metrics_snapshot()` into metric families at scrape time."""

    def __init__(self, source: MetricsSource) -> None:
        self.source = source

    def collect(self) -> Iterator[Any]:
        snap = self.source.metrics_snapshot()
        counters: dict[str, int] = snap.get("counters", {})
        changes = CounterMetricFamily("waystation_server_changes", "Changes handled, by outcome",
                                      labels=["outcome"])
        for outcome, key in (("applied", "applied"), ("duplicate", "duplicates"),
                             ("rejected", "rejected"), ("transient", "transient")):
            changes.add_metric([outcome], counters.get(key, 0))
        yield changes
        for name, key, text in (
                ("waystation_server_conflicts", "conflicts", "Conflict-log entries written"),
                ("waystation_server_dead_letters", "dead_letters",
                 "Bad input kept in the dead-letter store"),
                ("waystation_server_catchup_records", "catchup_records",
                 "Record states sent in catch-up pages"),
                ("waystation_server_missed_nudges", "missed_nudges",
                 "Devices back online without reconnecting shown the deltas they missed"),
                ("waystation_server_schema_redos", "schema_redos",
                 "Groups and catch-up reads run again after the registry or the schema "
                 "moved under them")):
            yield CounterMetricFamily(name, text, value=counters.get(key, 0))
        messages = CounterMetricFamily("waystation_server_messages", "MQTT messages",
                                       labels=["direction"])
        messages.add_metric(["in"], snap.get("messages_in", 0))
        messages.add_metric(["out"], snap.get("messages_out", 0))
        yield messages
        yield CounterMetricFamily("waystation_server_groups", "Store transactions (groups)",
                                  value=snap.get("groups", 0))
        yield CounterMetricFamily("waystation_server_group_seconds",
                                  "Seconds spent handling groups of messages",
                                  value=snap.get("group_seconds", 0.0))
        devices = GaugeMetricFamily("waystation_server_devices", "Devices", labels=["state"])
        devices.add_metric(["registered"], snap.get("devices_registered", 0))
        devices.add_metric(["online"], snap.get("devices_online", 0))
        devices.add_metric(["clock_off"], snap.get("devices_clock_off", 0))
        yield devices
        yield GaugeMetricFamily("waystation_server_inbox_messages",
                                "Messages waiting for the worker", value=snap.get("inbox", 0))
        yield from _intake(snap.get("intake"))
        yield CounterMetricFamily("waystation_server_dead_letters_counted",
                                  "Refusals only counted in a summary dead letter",
                                  value=counters.get("dead_letters_counted", 0))
        stored = snap.get("dead_letter_store")
        if stored:
            kept = GaugeMetricFamily("waystation_server_dead_letters_stored",
                                     "Dead letters kept in the store (at the last trim)",
                                     labels=["what"])
            for what in ("count", "bytes", "truncated"):
                kept.add_metric([what], stored[what])
            yield kept
            yield CounterMetricFamily("waystation_server_dead_letters_dropped",
                                      "Dead letters dropped by the store's bounds",
                                      value=stored["dropped"])
        yield from _zd3(snap.get("zd3"))
        yield GaugeMetricFamily("waystation_server_broker_connected",
                                "1 while connected to the broker",
                                value=1 if snap.get("connected") else 0)
        if snap.get("announce_connected") is not None:
            yield GaugeMetricFamily("waystation_server_announce_connected",
                                    "1 while the announcement link (over AMQP) is up",
                                    value=1 if snap["announce_connected"] else 0)


def _zd3(recent: dict[str, int] | None) -> Iterator[Any]:
    """The devices' recent messages as dictionary (capability zd3, broker.server.recent);
    nothing where the server does not serve it."""
    if not recent:
        return
    streams = CounterMetricFamily("waystation_server_zd3_streams",
                                  "Change messages compressed with the device's recent "
                                  "messages: read, or refused as dictionary_unknown",
                                  labels=["outcome"])
    streams.add_metric(["read"], recent["read"])
    streams.add_metric(["unknown"], recent["unknown"])
    yield streams
    yield GaugeMetricFamily("waystation_server_zd3_bytes",
                            "Memory held for the devices' recent messages (bounded by "
                            "merge.recent_dictionary_bytes)", value=recent["bytes"])


def _intake(intake: dict[str, Any] | None) -> Iterator[Any]:
    if not intake:
        return
    size = GaugeMetricFamily("waystation_server_intake_bytes",
                             "Bytes of messages waiting for the worker", labels=["state"])
    size.add_metric(["waiting"], intake["bytes"])
    size.add_metric(["peak"], intake["peak_bytes"])
    size.add_metric(["limit"], intake["max_bytes"])
    yield size
    yield GaugeMetricFamily("waystation_server_intake_devices",
                            "Devices with messages waiting", value=intake["devices"])
    messages = CounterMetricFamily("waystation_server_intake_messages",
                                   "Messages offered to the intake, by outcome",
                                   labels=["outcome"])
    messages.add_metric(["queued"], intake["queued"])
    messages.add_metric(["refused_too_large"], intake["refused"])
    messages.add_metric(["dropped_over_quota"], intake["dropped"])
    yield messages
    yield CounterMetricFamily("waystation_server_intake_dropped_bytes",
                              "Payload bytes of messages dropped over a device's quota",
                              value=intake["dropped_bytes"])
    yield CounterMetricFamily("waystation_server_intake_waits",
                              "Times the network thread waited for room (backpressure)",
                              value=intake["waits"])
    yield CounterMetricFamily("waystation_server_intake_wait_seconds",
                              "Seconds the network thread waited for room",
                              value=intake["wait_seconds"])


def serve_metrics(source: MetricsSource, port: int, host: str = "127.0.0.1", *,
                  max_connections: int = 16, timeout_s: float = 10.0) -> MetricsHttpServer:
    """Start the HTTP endpoint (a daemon thread, bounded: broker.server.metrics_http);
    returns the server for shutdown()."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServerCollector(source))
    server = MetricsHttpServer((host, port), registry, max_connections=max_connections,
                               timeout_s=timeout_s)
    server.start()
    return server
