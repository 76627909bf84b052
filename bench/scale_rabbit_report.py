"""The markdown tables of bench.scale_rabbit, from its result document."""

from __future__ import annotations

from typing import Any

from bench.common import print_table


def _each(values: list[float], digits: int = 0) -> str:
    return "/".join(f"{v:.{digits}f}" for v in values)


def report(result: dict[str, Any]) -> None:
    print()
    raw = result.get("raw_mqtt")
    st = result.get("storm")
    if st is not None:
        rs = result.get("raw_storm", {"settled_s": float("nan"), "done": 0})
        print_table(
            "Connect storm (all at once) to all caught up, three-node RabbitMQ cluster, "
            "one server (PostgreSQL)",
            ["devices", "raw MQTT connect+subscribe s (done)",
             "storm to all caught up s (done)", "server CPU s", "server RSS MiB",
             "node RSS MiB before/after (each)", "node CPU s (each)", "other load (cores)"],
            [[result["devices"], f"{rs['settled_s']:.1f} ({rs['done']:,})",
              f"{st['settled_s']:.1f} ({st['done']:,})", st["server_cpu_s"],
              st["server_rss_mb"],
              f"{_each(result['nodes_rss_before_mb'])} -> {_each(st['nodes_rss_mb'])}",
              _each(st["nodes_cpu_s"], 1), f"{st['load']['other_cores']:.2f}"]])
    idle = result.get("connected_idle")
    if idle is not None:
        print_table(
            "Every device connected, idle",
            ["devices", "s", "server cores", "server RSS MiB", "node cores (each)",
             "node RSS MiB (each)", "node RSS MiB, sessions offline (each)"],
            [[result["devices"], idle["seconds"], idle["server_cores"], idle["server_rss_mb"],
              _each(idle["nodes_cores"], 2), _each(idle["nodes_rss_mb"]),
              _each(result.get("nodes_rss_sessions_offline_mb", []))]])
    rows = result.get("throughput") or []
    if rows and raw is not None:
        base = rows[0]["changes_s"] if rows[0]["servers"] == 1 else None
        print_table(
            "Changes/s until every change is acked, three-node RabbitMQ cluster, beside raw "
            "QoS-1 through the same cluster (same run)",
            ["servers", "devices", "changes", "s", "changes/s", "vs 1 server",
             "server-side applied/s", "share per server %", "worker busy %",
             "server cores (each)", "node cores (each)", "server RSS MiB (each)",
             "raw pipelined msg/s", "raw p50 ms", "other load (cores)", "verified"],
            [[r["servers"], r["devices"], r["changes"], r["secs"], r["changes_s"],
              f"{r['changes_s'] / base:.2f}x" if base else "-",
              r["server_side"]["applied_s"], _each([s * 100 for s in r["share_by_server"]]),
              _each([b * 100 for b in r["busy_by_server"]]), _each(r["server_cores_each"], 2),
              _each(r["nodes_cores"], 2), _each(r["server_rss_mb"]),
              raw["pipelined_msg_s"], raw["rtt_ms_p50"], f"{r['load']['other_cores']:.2f}",
              "yes" if r["verify"]["ok"] else "NO"] for r in rows])
        for r in rows:
            if not r["verify"]["ok"]:
                print(f"WRONG: {r['servers']} server(s): {r['verify']['problems']}")
