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
                         "dead_letters": 4, "schema_redos": 2},
            "messages_in": 20, "messages_out": 31, "groups": 5, "group_seconds": 0.25,
            "devices_registered": 3, "devices_online": 2, "devices_clock_off": 1,
            "inbox": 0, "connected": True,
            "intake": {"bytes": 1000, "items": 2, "devices": 1, "peak_bytes": 5000,
                       "max_bytes": 9000, "device_bytes": 4000, "queued": 7, "refused": 2,
                       "refused_bytes": 600000, "dropped": 5, "dropped_bytes": 2500,
                       "waits": 1, "wait_seconds": 0.5},
            "dead_letter_store": {"count": 8, "bytes": 900, "truncated": 1, "oldest_ms": 1,
                                  "dropped": 3, "dropped_bytes": 300}}

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
        assert 'waystation_server_devices{state="clock_off"} 1.0' in text
        assert "waystation_server_broker_connected 1.0" in text
        assert "waystation_server_dead_letters_total 4.0" in text
        assert "waystation_server_schema_redos_total 2.0" in text
        assert 'waystation_server_intake_bytes{state="peak"} 5000.0' in text
        assert 'waystation_server_intake_bytes{state="limit"} 9000.0' in text
        assert ('waystation_server_intake_messages_total{outcome="dropped_over_quota"} 5.0'
                in text)
        assert ('waystation_server_intake_messages_total{outcome="refused_too_large"} 2.0'
                in text)
        assert "waystation_server_intake_wait_seconds_total 0.5" in text
        assert 'waystation_server_dead_letters_stored{what="bytes"} 900.0' in text
        assert "waystation_server_dead_letters_dropped_total 3.0" in text
        source.snap["counters"]["applied"] = 40
        source.snap["connected"] = False
        text = _scrape(port)
        assert 'waystation_server_changes_total{outcome="applied"} 40.0' in text
        assert "waystation_server_broker_connected 0.0" in text
    finally:
        server.shutdown()
