"""`waystation demo`: the whole system on one machine, with a narrated scenario.

It starts the embedded broker, the merge server and three devices — two delivery vans
and a warehouse scanner — each with its own LMDB store, all talking real MQTT over TCP
on 127.0.0.1. Then the vans drive out of coverage and keep working, their writes
collide in every way the merge rules handle, and they come back and converge. The demo
ends by checking that every device's view equals the server's, prints the conflict log,
and exits non-zero if anything failed to converge.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from waystation.config import AgentConfig, BrokerConfig, LogConfig, ServerConfig
from waystation.logs import configure_logging

SERVER_USER = "waystation-server"


@dataclass(frozen=True)
class DeviceSpec:
    id: str
    role: str
    scopes: tuple[str, ...]


DEVICES = (
    DeviceSpec("van-1", "delivery van, route 42", ("route-42", "depot-7", "fleet")),
    DeviceSpec("van-2", "delivery van, route 42", ("route-42", "depot-7", "fleet")),
    DeviceSpec("scanner-1", "warehouse scanner, depot 7", ("depot-7", "fleet")),
)


class DemoFailed(Exception):
    pass


class Demo:
    """Owns every part of the demo; `run()` plays the scenario."""

    def __init__(self, data_dir: Path, out: TextIO, *, pace: float = 1.0,
                 timeout_s: float = 60.0) -> None:
        self.dir = data_dir
        self.out = out
        self.pace = pace
        self.timeout_s = timeout_s
        self.port = _free_port()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker: Any = None
        self.server: Any = None
        self.agents: dict[str, Any] = {}
        self.failures: list[str] = []

    # ------------------------------------------------------------------ parts

    def start(self) -> None:
        from agent.daemon import AgentDaemon
        from broker.embedded.amqtt_broker import EmbeddedBroker
        from broker.embedded.passwords import write_password_entry
        from broker.server import registry
        from broker.server.daemon import MergeServer
        from broker.server.store import open_store
        from schemas.collection import example_catalog_path, load_catalog

        self.catalog = load_catalog(example_catalog_path())
        passwd = self.dir / "broker" / "passwd"
        passwd.parent.mkdir(parents=True, exist_ok=True)
        passwords = {d.id: secrets.token_urlsafe(16) for d in DEVICES}
        passwords[SERVER_USER] = secrets.token_urlsafe(16)
        for user, password in passwords.items():
            write_password_entry(passwd, user, password)

        bcfg = BrokerConfig.model_validate({"port": self.port, "password_file": str(passwd),
                                            "data_dir": str(self.dir / "broker")})
        self._broker = EmbeddedBroker.from_config(bcfg)
        started = threading.Event()
        errors: list[BaseException] = []

        def broker_thread() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._broker.start())
            except BaseException as exc:  # reported on the main thread
                errors.append(exc)
                started.set()
                return
            started.set()
            loop.run_forever()

        threading.Thread(target=broker_thread, name="demo-broker", daemon=True).start()
        started.wait(15)
        if errors:
            raise errors[0]
        self.say(f"broker    embedded amqtt on 127.0.0.1:{self.port}, per-device passwords and ACL")

        # The embedded broker has no shared subscriptions: one server, plain subscription.
        scfg = ServerConfig.model_validate({
            "data_dir": str(self.dir / "server"), "shared_group": False,
            "mqtt": {"port": self.port, "password": passwords[SERVER_USER]},
        })
        store = open_store(scfg)
        try:
            for d in DEVICES:
                registry.add_device(store, d.id, list(d.scopes), _now_ms())
        finally:
            store.close()
        self.server = MergeServer(scfg, self.catalog, env={})
        self.server.start()
        self.say(f"server    merge consumer, LMDB store in {self.dir / 'server'}")
        for d in DEVICES:
            acfg = AgentConfig.model_validate({
                "device_id": d.id, "data_dir": str(self.dir / d.id), "scopes": list(d.scopes),
                "mqtt": {"port": self.port, "password": passwords[d.id]},
                "sync": {"ack_timeout_s": 5.0, "status_interval_s": 5.0, "gap_timeout_s": 2.0,
                         "backoff_initial_s": 0.2, "backoff_max_s": 2.0},
            })
            daemon = AgentDaemon(acfg, self.catalog, env={})
            daemon.start()
            self.agents[d.id] = daemon
            self.say(f"device    {d.id:<10} {d.role}; scopes {', '.join(d.scopes)}")
        self.wait("every device connects", lambda: all(a.connected for a in self.agents.values()))

    def stop(self) -> None:
        for daemon in self.agents.values():
            with contextlib.suppress(Exception):
                daemon.stop(drain_s=1.0)
        if self.server is not None:
            with contextlib.suppress(Exception):
                self.server.stop()
        loop, broker = self._loop, self._broker
        if loop is not None and broker is not None:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(broker.stop(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)

    # ------------------------------------------------------------------ the scenario

    def run(self) -> int:
        van1, van2, scanner = (self.agents[d.id].agent for d in DEVICES)

        self.step("1. Morning at depot 7: stock is counted, the day's route is planned")
        scanner.put("inventory", "sku-100", {"depot": "depot-7", "sku": "sku-100",
                                             "name": "Bread flour 25 kg", "bin": "A-12"})
        scanner.increment("inventory", "sku-100", "stock", 40)
        scanner.put("inventory", "sku-200", {"depot": "depot-7", "sku": "sku-200",
                                             "name": "Olive oil 5 l", "bin": "C-03"})
        scanner.increment("inventory", "sku-200", "stock", 12)
        van1.put("tasks", "t-1", {"route": "route-42", "customer": "Hendrikse Bakery",
                                  "address": "Keizersgracht 12", "status": "out"})
        van1.put("tasks", "t-2", {"route": "route-42", "customer": "Cafe de Jaren",
                                  "address": "Nieuwe Doelenstraat 20", "status": "out"})
        self.settle("everyone has the plan")

        self.step("2. Both vans drive out of coverage (the broker fires their last wills)")
        self.agents["van-1"].go_offline()
        self.agents["van-2"].go_offline()
        self.wait("the server sees both vans offline",
                  lambda: not self.server.engine.is_online("van-1")
                  and not self.server.engine.is_online("van-2"))
        self.show_status()

        self.step("3. Offline, both drivers keep working; every write lands locally first")
        self.note("van-1 and van-2 edit different fields of task t-1 (they will merge)")
        self.show_write(van1.put("tasks", "t-1", {"status": "delivered",
                                                  "notes": "left at the back door"}))
        self.show_write(van2.put("tasks", "t-1", {"eta": 1_764_000_000_000}))
        self.note("both set t-2's status (last writer wins; the loser is logged)")
        self.show_write(van2.put("tasks", "t-2", {"status": "failed"}))
        time.sleep(0.01)
        self.show_write(van1.put("tasks", "t-2", {"status": "delivered"}))
        self.note("both change t-1's address, a 'manual' field: a person must decide")
        self.show_write(van1.put("tasks", "t-1", {"address": "Keizersgracht 12, rear entrance"}))
        self.show_write(van2.put("tasks", "t-1", {"address": "Keizersgracht 14"}))
        self.note("stock counters from three devices: van-1 takes 3, van-2 takes 5, the "
                  "scanner books a delivery of 10")
        self.show_write(van1.increment("inventory", "sku-100", "stock", -3))
        self.show_write(van2.increment("inventory", "sku-100", "stock", -5))
        self.show_write(scanner.increment("inventory", "sku-100", "stock", 10))
        self.note("van-2 tries to take 40 bottles of oil; only 12 exist (rule: stock >= 0)")
        self.show_write(van2.increment("inventory", "sku-200", "stock", -40))
        local = van2.get("inventory", "sku-200")
        self.note(f"van-2 sees sku-200 stock = {local.fields.get('stock') if local else '?'} "
                  "locally, pending the server's verdict")
        self.show_status()

        self.step("4. The vans come back into coverage and sync")
        self.agents["van-1"].go_online()
        self.agents["van-2"].go_online()
        self.settle("the fleet converges")

        self.step("5. Results")
        self.show_record("tasks", "t-1")
        self.show_record("tasks", "t-2")
        self.show_record("inventory", "sku-100")
        self.show_record("inventory", "sku-200")
        self.expect("sku-100 stock is 40 - 3 - 5 + 10 = 42 on the server",
                    self.server_field("inventory", "sku-100", "stock") == 42)
        self.expect("sku-200 stock stayed 12 (the oversized pick was rejected)",
                    self.server_field("inventory", "sku-200", "stock") == 12)
        dead = van2.dead_letters()
        for letter in dead:
            self.say(f"  van-2 dead letter: change van-2:{letter.n} {letter.code}: {letter.reason}")
        self.expect("van-2 kept the rejected change with its reason",
                    any(d.code == "rule_rejected" for d in dead))
        self.expect("t-2's status is the later write ('delivered', van-1)",
                    self.server_field("tasks", "t-2", "status") == "delivered")
        self.show_conflicts()

        self.step("6. The dispatcher settles the address conflict")
        self.resolve_address()
        self.settle("the resolution reaches every device")
        self.show_record("tasks", "t-1")

        self.step("7. Verification: every device equals the server")
        ok = self.verify()
        if self.failures:
            self.say("")
            for failure in self.failures:
                self.say(f"FAILED: {failure}")
            return 1
        self.say("")
        self.say("all devices converged; every concurrent write is accounted for" if ok else
                 "convergence FAILED")
        return 0 if ok else 1

    # ------------------------------------------------------------------ helpers

    def settle(self, what: str) -> None:
        """Wait (showing live status) until nothing is pending and all views match."""
        deadline = time.monotonic() + self.timeout_s
        last_print = 0.0
        while time.monotonic() < deadline:
            pending = sum(a.sync.pending_count() for a in self.agents.values())
            if pending == 0 and all(a.connected for a in self.agents.values()) \
                    and not self.mismatches():
                self.show_status()
                self.say(f"  -> {what}")
                return
            if time.monotonic() - last_print > 1.0 * self.pace:
                self.show_status()
                last_print = time.monotonic()
            time.sleep(0.05)
        self.show_status()
        self.failures.append(f"timed out after {self.timeout_s:.0f} s waiting until {what}")
        raise DemoFailed(what)

    def wait(self, what: str, cond: Callable[[], bool]) -> None:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if cond():
                return
            time.sleep(0.05)
        self.failures.append(f"timed out waiting until {what}")
        raise DemoFailed(what)

    def mismatches(self) -> list[Any]:
        from waystation.convergence import compare

        found: list[tuple[str, Any]] = []
        for d in DEVICES:
            agent = self.agents[d.id].agent
            found.extend((d.id, m) for m in compare(self.server.store, agent, d.scopes,
                                                    self.catalog.collections))
        return found

    def verify(self) -> bool:
        found = self.mismatches()
        for dev, m in found:
            self.say(f"  MISMATCH on {dev}: {m.describe()}")
        for d in DEVICES:
            count = sum(len(self.agents[d.id].agent.list(c)) for c in self.catalog.collections)
            self.say(f"  {d.id:<10} {count} records, identical to the server"
                     if not any(dev == d.id for dev, _ in found) else f"  {d.id:<10} differs")
        return not found

    def server_field(self, c: str, k: str, name: str) -> Any:
        from waystation import merge

        with self.server.store.read() as txn:
            raw = txn.get_record(c, k)
        if raw is None:
            return None
        return merge.to_rec(merge.from_json(raw)).get("f", {}).get(name)

    def resolve_address(self) -> None:
        from broker.server.operations import resolve_conflict
        from waystation.hlc import Clock

        with self.server.store.read() as txn:
            open_rows = [r for r in txn.conflicts(open_only=True, limit=100)
                         if (r.c, r.k, r.field) == ("tasks", "t-1", "address")]
        if not open_rows:
            self.failures.append("no open conflict on tasks/t-1 address to resolve")
            return
        row = open_rows[0]
        value = "Keizersgracht 12, rear entrance"
        res = resolve_conflict(self.server.store, self.catalog, Clock("~server", _now_ms),
                               row.id, value, _now_ms())
        self.say(f"  conflict #{row.id} resolved to {value!r} (record version {res.q}); the "
                 "server fans the new value out to every device")

    def expect(self, what: str, ok: bool) -> None:
        self.say(f"  [{'ok' if ok else 'FAILED'}] {what}")
        if not ok:
            self.failures.append(what)

    # ------------------------------------------------------------------ output

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def step(self, title: str) -> None:
        self.say("")
        self.say(f"== {title}")

    def note(self, text: str) -> None:
        self.say(f"  * {text}")

    def show_write(self, result: Any) -> None:
        self.say(f"    {result.message}")

    def show_status(self) -> None:
        parts = []
        for d in DEVICES:
            daemon = self.agents[d.id]
            st = daemon.agent.status()
            state = "online " if daemon.connected else "OFFLINE"
            parts.append(f"{d.id} {state} {st.pending:>2} pending")
        self.say("  status: " + " | ".join(parts))

    def show_record(self, c: str, k: str) -> None:
        from waystation import merge

        with self.server.store.read() as txn:
            raw = txn.get_record(c, k)
        if raw is None:
            self.say(f"  {c}/{k}: (absent)")
            return
        rec = merge.to_rec(merge.from_json(raw))
        fields = ", ".join(f"{n}={v!r}" for n, v in sorted(rec.get("f", {}).items()))
        self.say(f"  {c}/{k} v{rec['q']}: {fields}")
        for name, cands in rec.get("cf", {}).items():
            options = ", ".join(f"{c_['v']!r} ({c_['by']})" for c_ in cands)
            self.say(f"      open conflict on {name}: kept {rec['f'].get(name)!r}; "
                     f"candidates {options}")

    def show_conflicts(self) -> None:
        with self.server.store.read() as txn:
            rows = txn.conflicts(open_only=False, limit=100)
        self.say(f"  conflict log ({len(rows)} entries):")
        for row in rows:
            entry = row.entry
            loser = entry.get("loser") or {}
            winner = entry.get("winner") or {}
            state = "OPEN" if row.open else "logged"
            self.say(f"    #{row.id} {state:<6} {row.c}/{row.k}.{row.field} [{entry.get('kind')}]"
                     f" kept {_val(winner)} / lost {_val(loser)}")


def _val(version: Any) -> str:
    if not version:
        return "-"
    if isinstance(version, dict):
        return f"{version.get('v')!r} by {version.get('by')}"
    if isinstance(version, list) and len(version) >= 3:
        return f"{version[0]!r} by {version[2]}"
    return repr(version)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def _data_dir(path: Path | None, keep: bool) -> Iterator[Path]:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        if any(path.iterdir()):
            raise SystemExit(f"error: {path} is not empty; the demo needs a fresh directory")
        yield path
        return
    tmp = Path(tempfile.mkdtemp(prefix="waystation-demo-"))
    try:
        yield tmp
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


def cmd_demo(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`waystation demo`: broker + server + three devices, a narrated offline scenario."""
    configure_logging(LogConfig(level="error"))
    data = getattr(args, "data_dir", None)
    keep = bool(getattr(args, "keep", False)) or data is not None
    with _data_dir(Path(data) if data is not None else None, keep) as path:
        demo = Demo(path, sys.stdout)
        print(f"Waystation demo — data in {path}{'' if keep else ' (removed at the end)'}")
        try:
            demo.start()
            code = demo.run()
        except DemoFailed as exc:
            print(f"\nFAILED: timed out waiting until {exc}", file=sys.stderr)
            code = 1
        finally:
            demo.stop()
        return code
