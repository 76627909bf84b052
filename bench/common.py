"""Shared helpers for benchmarks: timing, a printed table, JSON results."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

RESULTS = Path(__file__).parent / "results"


def time_per_call(fn: Callable[[], object], *, min_time: float = 0.5, repeat: int = 5) -> float:
    """Best-of-`repeat` seconds per call of `fn`, each run lasting at least `min_time`."""
    calls = 1
    while True:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        elapsed = time.perf_counter() - start
        if elapsed >= min_time / 5:
            break
        calls *= 2
    per_run = max(1, int(calls * (min_time / max(elapsed, 1e-9))))
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(per_run):
            fn()
        best = min(best, (time.perf_counter() - start) / per_run)
    return best


def percentile(samples: Sequence[float], p: float) -> float:
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    idx = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[idx]


def median(samples: Sequence[float]) -> float:
    return statistics.median(samples) if samples else float("nan")


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    lines = [f"### {title}", "",
             "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for row in cells:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
    text = "\n".join(lines)
    print(text, flush=True)
    print()
    return text


def write_json(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    payload = {"benchmark": name, "machine": machine(), "when": when, **data}
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    print(f"results written to {path}")
    return path


def machine() -> dict[str, Any]:
    """The host and the software a result was measured with (stored in every result
    file: absolute figures depend on them)."""
    return {"python": platform.python_version(), "cpus": os.cpu_count(),
            "platform": platform.platform(), "cpu_model": _cpu_model(),
            "load_avg_1m": os.getloadavg()[0], "versions": versions()}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions() -> dict[str, str]:
    """Versions of Waystation (its git commit) and of what it runs on."""
    out: dict[str, str] = {}
    for dist in ("waystation", "lmdb", "paho-mqtt", "amqtt", "orjson", "pydantic",
                 "psycopg"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    repo = Path(__file__).resolve().parent.parent
    try:
        out["git_commit"] = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
            timeout=10, check=True).stdout.strip()
        if subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--",
                           "agent", "broker", "waystation", "schemas", "bench/*.py"],
                          capture_output=True, text=True, timeout=10).stdout.strip():
            out["git_commit"] += "+uncommitted changes"
    except (OSError, subprocess.SubprocessError):
        pass
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    try:
        # `mosquitto -h` prints "mosquitto version X.Y.Z" first (and exits non-zero)
        head = subprocess.run([mosquitto, "-h"], capture_output=True, text=True,
                              timeout=10).stdout.splitlines()
        if head:
            out["mosquitto"] = head[0].rpartition(" ")[2]
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value >= 1000:
            return f"{value:,.0f}"
        if value >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def serve_commands(make: Callable[[TextIO], Any]) -> int:
    """The loop of a benchmark helper process: one JSON command per stdin line
    (``{"cmd": NAME, ...arguments}``), answered by calling method NAME of ``make(out)``
    and writing its JSON reply as one line; ``stop`` ends it. stdout carries answers
    only: anything else that prints goes to stderr (the process's log)."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    target = make(out)
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        cmd = req.pop("cmd")
        try:
            reply = getattr(target, cmd)(**req)
        except Exception as exc:
            traceback.print_exc()
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(reply) + "\n")
        if cmd == "stop":
            break
    return 0

