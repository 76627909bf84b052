"""The committed JSON Schemas (schemas/json/) against real messages and against the text.

A real device agent (LMDB store, `agent.sync`) and a real merge engine (LMDB store) talk
in-process: every payload either of them produces - the agent's `status`, `hello`,
`catchup` and `changes` exactly as its daemon encodes them, the engine's `ack`,
`reject`, `delta`, `page`, `checkpoint` and `command` - is validated against the
committed schema of its type, so the schemas and the code cannot drift apart. Then the
schemas must refuse what PROTOCOL.md says a sender MUST NOT send.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest

from agent.api import Agent
from broker.server import schema_history
from broker.server.engine import Engine
from broker.server.registry import issue_command
from schemas import codec, wire, zdict
from schemas.collection import Catalog, example_catalog_path, load_catalog
from schemas.export import JSON_DIR
from tests.agent.agentkit import FakeClock, make_cfg
from tests.schema_versions import V1, V2
from tests.server.helpers import T0, hp, make_engine

SCOPES = ("route-42", "depot-7", "fleet")
AGENT_NAME = "waystation/test"
COMPRESS_OVER = 512


def _schemas() -> dict[str, jsonschema.protocols.Validator]:
    validators = {}
    for path in sorted(JSON_DIR.glob("*.json")):
        schema = json.loads(path.read_text(encoding="utf-8"))
        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)
        validators[path.stem] = cls(schema)
    return validators


SCHEMAS = _schemas()


def _errors(kind: str, doc: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in SCHEMAS[kind].iter_errors(doc)]


def _decode(payload: bytes) -> dict[str, Any]:
    if payload[:1] == b"\x78":
        payload = zdict.unpack(payload)  # zd1 streams too (schemas.zdict)
    doc: dict[str, Any] = orjson.loads(payload)
    return doc


class Wire:
    """Carries payloads between agents and the engine, validating every one of them."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.agents: dict[str, Agent] = {}
        self.seen: list[tuple[str, dict[str, Any]]] = []  # (sender, message)
        self.compressed: Counter[str] = Counter()

    def check(self, sender: str, payload: bytes) -> dict[str, Any]:
        doc = _decode(payload)
        if payload[:1] == b"\x78":
            self.compressed[doc["type"]] += 1
        problems = _errors(doc["type"], doc)
        assert not problems, f"{sender} sent a {doc['type']} its schema refuses: {problems}"
        for rec in _recs(doc):
            assert not _errors("rec", rec), (rec, _errors("rec", rec))
        for ch in doc.get("ch", []) if doc["type"] == "changes" else []:
            assert not _errors("change", ch), (ch, _errors("change", ch))
        self.seen.append((sender, doc))
        return doc

    def up(self, dev: str, payload: bytes) -> None:
        self.check(dev, payload)
        self.deliver(self.engine.handle_up(dev, payload))

    def raw_up(self, dev: str, payload: bytes) -> None:
        """Bytes from a hostile device: not ours to validate, only the answers are."""
        self.deliver(self.engine.handle_up(dev, payload))

    def status(self, dev: str, payload: bytes) -> None:
        self.check(dev, payload)
        self.deliver(self.engine.handle_status(dev, payload))

    def deliver(self, out: list[tuple[str, bytes]]) -> None:
        for dev, payload in out:
            self.check("server", payload)
            agent = self.agents.get(dev)
            if agent is not None:
                self._apply(agent, payload)

    def _apply(self, agent: Agent, payload: bytes) -> None:
        """What the agent daemon does with a down message (agent/daemon.py)."""
        sync = agent.sync
        msg = codec.decode(payload, allowed=wire.DOWN_TYPES)
        if isinstance(msg, wire.Ack):
            sync.apply_ack(msg)
        elif isinstance(msg, wire.Reject):
            sync.apply_reject(msg)
        elif isinstance(msg, wire.Delta):
            sync.apply_delta(msg)
        elif isinstance(msg, wire.Page):
            sync.apply_page(msg)
            if msg.more:
                cont = wire.Catchup(dev=agent.device_id, req=msg.req, cp={msg.s: msg.to},
                                    lim=agent._core.settings.catchup_page)
                self.up(agent.device_id, codec.encode(cont, compress_over=COMPRESS_OVER))
        elif isinstance(msg, wire.Checkpoint):
            sync.apply_checkpoint(msg)
        elif isinstance(msg, wire.Command):
            sync.execute_command(msg)
            self.hello(agent)
        elif isinstance(msg, wire.Welcome):
            sync.apply_welcome(msg)
        elif isinstance(msg, wire.SchemaPush):
            taken = sync.take_schema(msg)
            if taken is not None and taken.changed:
                self.hello(agent)

    def hello(self, agent: Agent) -> None:
        self.up(agent.device_id, codec.encode(agent.sync.hello(AGENT_NAME, z=True)))

    def connect(self, agent: Agent) -> None:
        """The daemon's connect sequence: status on, hello, catchup."""
        dev = agent.device_id
        self.status(dev, codec.encode(agent.sync.status_message(True, AGENT_NAME)))
        self.hello(agent)
        self.catchup(agent)

    def catchup(self, agent: Agent) -> None:
        req = agent.sync.catchup_request(f"c-{len(self.seen)}")
        self.up(agent.device_id, codec.encode(req, compress_over=COMPRESS_OVER))

    def flush(self, agent: Agent) -> None:
        """Send the outbox in batches until nothing is left unanswered."""
        sent: set[int] = set()
        while True:
            caps = agent.sync.server_caps
            batch = agent.sync.next_batch(sent, max_changes=4,
                                          txn=caps is not None and "txn" in caps)
            if not batch:
                return
            sent.update(batch.numbers)
            self.up(agent.device_id, batch.payload(agent.device_id,
                                                   compress_over=COMPRESS_OVER))

    def types(self, sender: str | None = None) -> Counter[str]:
        return Counter(doc["type"] for who, doc in self.seen
                       if sender is None or (who == "server") == (sender == "server"))


def _recs(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    kind = doc["type"]
    if kind == "ack":
        yield from doc.get("fx", [])
    elif kind == "delta":
        yield from doc["d"]
    elif kind == "page":
        yield from doc["recs"]
    elif kind == "reject":
        yield from (rj["rec"] for rj in doc["rj"] if "rec" in rj)


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog(example_catalog_path())


@pytest.fixture
def traffic(tmp_path: Path, catalog: Catalog) -> Iterator[Wire]:
    """A day of a small fleet, in-process: two agents, one raw protocol device, one engine."""
    engine, store, now = make_engine(tmp_path / "server", {
        "van-1": list(SCOPES), "van-2": ["route-42", "depot-7"], "pd-1": ["depot-7"]})
    link = Wire(engine)
    agents = []
    for dev in ("van-1", "van-2"):
        cfg = make_cfg(tmp_path / dev, device=dev, scopes=SCOPES)
        cfg = cfg.model_copy(update={"sync": cfg.sync.model_copy(update={"catchup_page": 2})})
        agents.append(Agent.open(cfg, catalog, now_ms=FakeClock(T0 - 60_000)))
    one, two = agents
    link.agents = {"van-1": one, "van-2": two}
    try:
        link.connect(one)
        one.put("tasks", "t-1", {"route": "route-42", "customer": "Hendrikse Bakery",
                                 "status": "out", "address": "Dock 1"})
        one.increment("tasks", "t-1", "attempts", 1)
        one.add("tasks", "t-1", "labels", ["fragile", "heavy"])
        one.remove("tasks", "t-1", "labels", ["heavy"])
        one.put("inventory", "sku-1", {"depot": "depot-7", "sku": "sku-1", "name": "Flour"})
        one.increment("inventory", "sku-1", "stock", 5)
        one.put("tasks", "t-2", {"route": "route-42", "status": "out"})
        one.delete("tasks", "t-2")
        one.put("tasks", "t-3", {"route": "route-42", "status": "out", "eta": T0})
        one.put("inspections", "i-1", {"vehicle": "van-1", "result": "pass"})
        link.flush(one)

        # van-2 arrives late: a paged catch-up (2 records a page), `fleet` denied.
        link.connect(two)
        # Concurrent edits: a manual conflict, and a decrement the counter's min refuses.
        one.put("tasks", "t-1", {"address": "Dock 4"})
        two.put("tasks", "t-1", {"address": "Dock 9"})
        one.increment("inventory", "sku-1", "stock", -5)
        two.increment("inventory", "sku-1", "stock", -5)
        link.flush(one)
        link.flush(two)
        # Transactions (capability txn): one applied whole, one refused whole.
        with one.transaction() as tx:
            tx.put("tasks", "o-1", {"route": "route-42", "status": "ordered"})
            tx.increment("inventory", "sku-1", "stock", 2)
        with one.transaction() as tx:
            tx.put("tasks", "o-2", {"route": "route-42", "status": "ordered"})
            tx.increment("inventory", "sku-1", "stock", -100)
        link.flush(one)
        # A batch delivered again: re-acked with whole records.
        first_batch = next(doc for who, doc in link.seen
                           if who == "van-1" and doc["type"] == "changes")
        link.up("van-1", orjson.dumps(first_batch))
        # An operator's command reaches the online device and is reported done.
        issue_command(store, "van-1", "ping", now())
        link.deliver(engine.tick())
        link.status("van-2", codec.encode(two.sync.status_message(False, AGENT_NAME)))

        # What the agents never provoke, from a device speaking raw bytes.
        future = hp(now() + 86_400_000)
        link.raw_up("pd-1", orjson.dumps({"type": "changes", "v": 1, "dev": "pd-1", "sv": 1, "ch": [
            {"n": 1, "h": future, "c": "inventory", "k": "sku-1", "s": "depot-7", "b": 0,
             "op": "put", "f": {"bin": "Z-9"}},
            {"n": 2, "h": hp(now()), "c": "inventory", "k": "sku-1", "s": "depot-7", "b": 0,
             "op": "put", "f": {"colour": "red"}},
            {"n": 3, "oops": True}]}))
        link.raw_up("pd-1", b"{not json")
        link.raw_up("pd-1", orjson.dumps({"type": "catchup", "v": 1, "dev": "pd-1", "req": "r",
                                      "cp": {"depot-7": 10**9, "route-42": 0}}))
        # The operator publishes two schema versions: the online van-1 is sent version 2
        # (capability schema_push), takes it and says so in a hello.
        schema_history.publish(store, V1, "v1.toml", now())
        schema_history.publish(store, V2, "v2.toml", now())
        link.deliver(engine.tick())
        assert one.catalog.version == 2
        yield link
    finally:
        for agent in agents:
            agent.close()
        store.close()


def test_real_traffic_validates_against_the_committed_schemas(traffic: Wire) -> None:
    """Every message the agent and the server produced in a day of sync - each of the 14
    types, with their optional parts - is valid against its committed schema."""
    assert set(traffic.types("agents")) == {"status", "hello", "catchup", "changes"}
    assert set(traffic.types("server")) == {"ack", "reject", "delta", "page", "checkpoint",
                                            "command", "welcome", "schema"}
    server = [doc for who, doc in traffic.seen if who == "server"]
    recs = [rec for doc in server for rec in _recs(doc)]
    parts = {
        "ack.fx": any(d.get("fx") for d in server if d["type"] == "ack"),
        "ack.rs": any(d.get("rs") for d in server if d["type"] == "ack"),
        "reject.rj.rec": any(rj.get("rec") for d in server if d["type"] == "reject"
                             for rj in d["rj"]),
        "reject.err": any(d.get("err") for d in server if d["type"] == "reject"),
        "page.more": any(d["more"] for d in server if d["type"] == "page"),
        "page.reset": any(d["reset"] for d in server if d["type"] == "page"),
        "checkpoint.denied": any(d.get("denied") for d in server if d["type"] == "checkpoint"),
        "rec.cf": any(r.get("cf") for r in recs),
        "rec.t": any(r.get("t") for r in recs),
        "rec.x": any(r.get("x") for r in recs),
        "rec.part": any(r.get("part") for r in recs),
        "hello.done": any(d.get("done") for who, d in traffic.seen
                          if who != "server" and d["type"] == "hello"),
        "compressed": sum(traffic.compressed.values()) > 0,
        "change.tx": any(ch.get("tx") for who, d in traffic.seen
                         if who != "server" and d["type"] == "changes" for ch in d["ch"]),
        "reject.txn_aborted": any(rj["code"] == "txn_aborted" for d in server
                                  if d["type"] == "reject" for rj in d["rj"]),
    }
    assert [name for name, present in parts.items() if not present] == []


def test_agent_writes_required_members_at_their_defaults(traffic: Wire) -> None:
    """The agent's changes carry `b` even when it is 0, and the server's pages and
    rejects carry `reset`/`more`/`recs` and `rj` even at their usual values (§3)."""
    changes = [ch for who, d in traffic.seen if who != "server" and d["type"] == "changes"
               for ch in d["ch"]]
    assert any(ch["b"] == 0 for ch in changes)
    pages = [d for who, d in traffic.seen if d["type"] == "page"]
    assert any(not p["reset"] and not p["more"] for p in pages)
    assert any(d["rj"] == [] for who, d in traffic.seen if d["type"] == "reject")


# ------------------------------------------------------------------------ the text's rules

_CHANGE = {"n": 1, "h": "0192f2a4c9b10000", "c": "tasks", "k": "t-1", "s": "route-42", "b": 0,
           "op": "put", "f": {"status": "out"}}
_PAGE = {"type": "page", "v": 1, "req": "c-1", "s": "route-42", "from": 0, "to": 1,
         "reset": False, "more": False, "recs": []}
_REC = {"c": "tasks", "k": "t-1", "s": "route-42", "q": 1}


def _without(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != name}


@pytest.mark.parametrize(("kind", "doc"), [
    ("change", _CHANGE),
    ("change", {**_without(_CHANGE, "f"), "op": "del"}),
    ("change", {**_CHANGE, "k": "t" * 200, "f": {}, "i": {"attempts": -1.5}}),
    ("change", {**_CHANGE, "a": {"labels": ["x"]}, "r": {"labels": {"y": ["van-1:1"]}}}),
    ("page", _PAGE),
    ("reject", {"type": "reject", "v": 1, "rj": []}),
    ("rec", {**_REC, "x": True, "xh": "0192f2a4c9b10000:van-1"}),
    ("rec", {**_REC, "cf": {"address": [{"v": None, "by": "~server",
                                         "h": "0192f2a4c9b10000:~server"}]}}),
    ("catchup", {"type": "catchup", "v": 1, "dev": "van-1", "req": "r", "cp": {"route-42": 0}}),
])
def test_schemas_accept_what_the_text_allows(kind: str, doc: dict[str, Any]) -> None:
    """Minimal valid messages of the text pass their schema."""
    assert _errors(kind, doc) == []


@pytest.mark.parametrize(("kind", "doc"), [
    ("change", _without(_CHANGE, "b")),                       # b is required (§7.2)
    ("change", {**_CHANGE, "k": ""}),                          # 1 to 200 bytes (§2)
    ("change", {**_CHANGE, "k": "t" * 201}),
    ("change", {**_CHANGE, "k": "line\nbreak"}),               # nothing below U+0020
    ("change", {**_CHANGE, "k": "tab\there"}),
    ("change", {**_CHANGE, "op": "del"}),                      # a del names no field
    ("change", {**_without(_CHANGE, "f")}),                    # a put names one
    ("change", {**_CHANGE, "f": {}}),
    ("change", {**_CHANGE, "f": {"bad-name": 1}}),             # field names (§2)
    ("change", {**_CHANGE, "i": {"attempts": 0}}),             # an increment is not 0
    ("change", {**_CHANGE, "a": {"labels": []}}),              # an add names members
    ("change", {**_CHANGE, "a": {"labels": [""]}}),            # members are 1..200 bytes
    ("change", {**_CHANGE, "r": {"labels": {}}}),
    ("page", _without(_PAGE, "reset")),                        # required (§7.7)
    ("page", _without(_PAGE, "more")),
    ("page", _without(_PAGE, "recs")),
    ("reject", {"type": "reject", "v": 1}),                    # rj is required (§7.5)
    ("rec", {**_REC, "x": True}),                              # xh exactly when x (§6)
    ("rec", {**_REC, "xh": "0192f2a4c9b10000:van-1"}),
    ("rec", {**_REC, "cf": {"address": [{"by": "van-7", "h": "0192f2a4c9b10000:van-7"}]}}),
    ("rec", {**_REC, "cf": {"address": [{"v": 1, "by": "not a device",
                                         "h": "0192f2a4c9b10000:van-7"}]}}),
    ("catchup", {"type": "catchup", "v": 1, "dev": "van-1", "req": "r",
                 "cp": {"not a scope!": 0}}),                  # scopes (§2)
    ("checkpoint", {"type": "checkpoint", "v": 1, "req": "r", "cp": {"": 1}}),
])
def test_schemas_refuse_what_the_text_forbids(kind: str, doc: dict[str, Any]) -> None:
    """What a sender MUST NOT send fails its schema, even where the decoder is lenient."""
    assert _errors(kind, doc) != []


def test_the_decoder_stays_lenient_where_the_text_allows_it() -> None:
    """A receiver MAY treat a missing `b`, `reset`, `more`, `recs` or `rj` as its usual
    value (§3): the models still accept what the schemas now refuse."""
    change = codec.decode(orjson.dumps({"type": "changes", "v": 1, "dev": "van-1", "sv": 1,
                                        "ch": [_without(_CHANGE, "b")]}))
    assert isinstance(change, wire.Changes) and change.ch[0].b == 0
    page = codec.decode(orjson.dumps({"type": "page", "v": 1, "req": "r", "s": "route-42",
                                      "from": 0, "to": 0}))
    assert isinstance(page, wire.Page)
    assert (page.reset, page.more, list(page.recs)) == (False, False, [])
    reject = codec.decode(b'{"type":"reject","v":1}')
    assert isinstance(reject, wire.Reject) and reject.rj == []


def test_encoded_defaults_satisfy_the_schemas() -> None:
    """`codec.encode` writes every member a schema requires, even at its default."""
    msgs: list[wire.Message] = [
        wire.Changes(dev="van-1", sv=1, ch=[wire.Change.model_validate(_CHANGE)]),
        wire.Page.model_validate({**_without(_PAGE, "reset")}),
        wire.Reject(),
        wire.Ack(ok=[(1, "route-42", 1)], fx=[wire.Rec.model_validate(
            {**_REC, "cf": {"address": [{"v": None, "by": "van-7",
                                         "h": "0192f2a4c9b10000:van-7"}]}})]),
    ]
    for msg in msgs:
        doc = orjson.loads(codec.encode(msg))
        assert _errors(doc["type"], doc) == [], doc
