"""The server's Prometheus endpoint serves what the running server counts."""

from __future__ import annotations

import urllib.request
from typing import Any

from broker.server.metrics import serve_metrics
from tests.helpers import free_port


class _Counts:
    """A stand-in source with the snapshot shape MergeServer.metrics_snapshot returns."""

    def __init__(self) -> None:
        self.snap: dict[str, Any] = {
            "counters": {"applied": 12, "duplicates": 3, "rejected": 1, "conflicts": 2,
                         "dead_letters": 4},
            "messages_in": 20, "messages_out": 31, "groups": 5, "group_seconds": 0.25,
            "devices_registered": 3, "devices_online": 2, "inbox": 0, "connected": True}

    def metrics_snapshot(self) -> dict[str, Any]:
        return self.snap


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return str(resp.read().decode())


def test_metrics_endpoint_reports_counters_and_follows_changes() -> None:
    """A scrape shows changes by outcome, devices and broker state; a second scrape
    shows the new values (nothing is cached)."""
    source = _Counts()
    port = free_port()
    server = serve_metrics(source, port)
    try:
        text = _scrape(port)
        assert 'waystation_server_changes_total{outcome="applied"} 12.0' in text
        assert 'waystation_server_changes_total{outcome="duplicate"} 3.0' in text
        assert 'waystation_server_devices{state="online"} 2.0' in text
        assert "waystation_server_broker_connected 1.0" in text
        assert "waystation_server_dead_letters_total 4.0" in text
        source.snap["counters"]["applied"] = 40
        source.snap["connected"] = False
        text = _scrape(port)
        assert 'waystation_server_changes_total{outcome="applied"} 40.0' in text
        assert "waystation_server_broker_connected 0.0" in text
    finally:
        server.shutdown()
