"""Shared fixtures of the wire-schema tests: one realistic instance of every message."""

from __future__ import annotations

import pytest

from schemas.wire import (
    Ack,
    Candidate,
    Catchup,
    CertIssued,
    Change,
    Changes,
    Checkpoint,
    Command,
    Csr,
    Delta,
    ErrorInfo,
    Fetch,
    Fetched,
    Hello,
    Message,
    Page,
    Rec,
    Reject,
    Rejection,
    SchemaPush,
    ServerState,
    Status,
    Welcome,
)


def sample_messages() -> dict[str, Message]:
    """Realistic messages keyed by a label whose part before '-' is the message type."""
    whole = Rec(
        c="tasks",
        k="t-1",
        s="route-42",
        q=1203,
        f={
            "status": "delivered",
            "notes": "gate locked",
            "attempts": 2,
            "tags": ["fragile", "late"],
            "dims": {"w": 1.5, "h": [10, 20], "ok": True, "none": None},
        },
        h={"status": "0192f2a4c9b10003:van-12", "notes": "0192f2a4c9a80000:~server"},
        t={"tags": {"fragile": ["van-12:3"], "late": ["van-7:9", "van-12:11"]}},
        cf={
            "notes": [
                Candidate(v="Dock 4", by="van-7", h="0192f2a4c9b20000:van-7"),
                Candidate(v=None, by="van-9", h="0192f2a4c9b20001:van-9"),
            ]
        },
    )
    tombstone = Rec(c="tasks", k="t-2", s="route-42", q=1204, x=True, xh="0192f2a4c9b30000:van-7")
    partial = Rec(c="tasks", k="t-1", s="route-42", q=1205, part=True, f={"attempts": 3})
    return {
        "hello": Hello(dev="van-12", agent="waystation/0.1.0", sv=3, z=True, done=["cmd-7"]),
        "hello-caps": Hello(dev="van-12", agent="waystation/0.1.0", sv=3, caps=["txn", "schema"]),
        "hello-minimal": Hello(dev="v", agent="", sv=0),
        "hello-cert": Hello(dev="van-12", agent="waystation/0.1.0", sv=3,
                            caps=["cert_renew"], crt="c-19a-1f", cexp=1_760_000_000_000),
        "changes": Changes(
            dev="van-12",
            sv=3,
            ch=[
                Change(
                    n=17,
                    h="0192f2a4c9b10000",
                    c="tasks",
                    k="t-1",
                    s="route-42",
                    b=1188,
                    op="put",
                    f={"status": "delivered", "dims": {"w": 2.25, "list": [1, "two", None]}},
                    i={"attempts": 1, "weight": -0.5},
                ),
                Change(
                    n=18,
                    h="0192f2a4c9b20000",
                    c="tasks",
                    k="t-1",
                    s="route-42",
                    b=1188,
                    op="put",
                    a={"tags": ["fragile", "heavy"]},
                    r={"tags": {"late": ["van-7:9", "van-12:11"]}},
                ),
                Change(n=19, h="0192f2a4c9b30000", c="tasks", k="t-2 ü/€", s="route-42", op="del"),
            ],
        ),
        "catchup": Catchup(
            dev="van-12",
            req="c-1",
            cp={"route-42": 1188, "depot-3": 0},
            snap=["depot-3"],
            lim=500,
        ),
        "catchup-minimal": Catchup(dev="van-12", req="c-2", cp={}),
        "ack": Ack(
            ok=[(17, "route-42", 1191), (18, "route-42", 1192), (5, "depot-3", 0)],
            fx=[partial, whole],
            rs=[17],
        ),
        "reject": Reject(
            rj=[
                Rejection(
                    n=20,
                    code="rule_rejected",
                    reason="status may not go back to 'open'",
                    perm=True,
                    rec=whole,
                ),
                Rejection(n=21, code="schema_version", reason="server runs 2", perm=False),
            ]
        ),
        "reject-err": Reject(err=ErrorInfo(code="wrong_device", reason="dev is not van-12")),
        "delta": Delta(d=[partial, tombstone]),
        "page": Page.model_validate(
            {
                "req": "c-1",
                "s": "route-42",
                "from": 1188,
                "to": 1205,
                "reset": True,
                "more": True,
                "recs": [whole, tombstone],
            }
        ),
        "checkpoint": Checkpoint(req="c-1", cp={"route-42": 1205, "depot-3": 17}, denied=["hq"]),
        "fetch": Fetch(dev="van-12", req="f-1", c="tasks", k=["t-1", "t-9"]),
        "fetched": Fetched(req="f-1", c="tasks", recs=[whole, tombstone], miss=["t-9"]),
        "fetched-empty": Fetched(req="f-2", c="tasks", miss=["t-3"]),
        "command": Command(id="cmd-7", cmd="wipe"),
        "command-args": Command(id="cmd-8", cmd="ping", args={"note": "x", "n": [1, 2.5]}),
        "welcome": Welcome(caps=["txn"], srv="waystation-server/0.1.0"),
        "welcome-none": Welcome(caps=[]),
        "schema": SchemaPush(sv=3, text="version = 3\n[collections.tasks]\n"
                             'scope_field = "route"\n[collections.tasks.fields]\n'
                             'route = { type = "string" }\n'),
        "command-sync": Command(id="sync-1", cmd="sync"),
        "command-cert": Command(id="cert-1", cmd="cert_renew",
                                args={"dev": "van-12", "renewal": "c-19a-1f",
                                      "t": 1_730_000_000_000}),
        "csr": Csr(dev="van-12", rid="c-19a-1f",
                   csr="-----BEGIN CERTIFICATE REQUEST-----\nMIIBDzCBtQIBADAS\n"
                       "-----END CERTIFICATE REQUEST-----\n"),
        "cert": CertIssued(rid="c-19a-1f",
                           cert="-----BEGIN CERTIFICATE-----\nMIIBaz\n"
                                "-----END CERTIFICATE-----\n",
                           ca="-----BEGIN CERTIFICATE-----\nMIIBcD\n"
                              "-----END CERTIFICATE-----\n"),
        "server": ServerState(grp="main", srv="server-1", on=True, t=1_730_000_000_000),
        "server-will": ServerState(grp="main", srv="server-1", on=False),
        "status": Status(
            dev="van-12",
            on=True,
            agent="waystation/0.1.0",
            sv=3,
            t=1_730_000_000_000,
            pend=2,
            old=35_000,
            dl=0,
        ),
        "status-will": Status(dev="van-12", on=False),
    }


@pytest.fixture(scope="session")
def samples() -> dict[str, Message]:
    """Realistic messages of every type (see `sample_messages`)."""
    return sample_messages()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test taking `sample` runs once per realistic message (ids are the labels)."""
    if "sample" in metafunc.fixturenames:
        messages = sample_messages()
        metafunc.parametrize("sample", list(messages.values()), ids=list(messages))
