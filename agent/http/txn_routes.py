"""Transactions over the local API: one call, a list of operations, all or none.

    POST /v1/txn  {"ops": [{"op": "put", "collection": "orders", "key": "o-7",
                            "fields": {...}},
                           {"op": "increment", "collection": "inventory", "key": "bin-a",
                            "field": "stock", "amount": -2}, ...],
                   "priority": 0}
    -> 202 {"results": [<one write result per op>], "change_ids": [...], "message": ...}

Same semantics as `with agent.transaction() as tx:` (agent.transaction,
docs/TRANSACTIONS.md): every operation is written in ONE durable LMDB transaction, or
none is (the first refused operation answers 4xx naming its index, and nothing is
written). Limits, so that memory stays bounded whatever is sent: at most
`MAX_TXN_OPS` (100) operations, at most `MAX_TXN_BYTES` (128 KiB) of resulting changes,
and the whole body within `api.max_body_bytes`. The token needs --write on every
collection named.
"""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from agent.api import Agent
from agent.errors import AgentError
from agent.http import idempotency as idem
from agent.http import inputs
from agent.http.errors import ApiError, from_agent_error, json_response
from agent.http.models import JsonValue, Priority, WriteResultOut
from agent.idempotency import Once
from agent.models import WriteResult
from agent.transaction import MAX_TXN_OPS

_Name = Annotated[str, Field(strict=True, min_length=1, max_length=200)]


class _Op(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    collection: _Name
    key: _Name


class PutOp(_Op):
    """Set lww/manual fields (creating the record: include its scope field)."""

    op: Literal["put"]
    fields: Annotated[dict[str, JsonValue], Field(min_length=1)]


class DeleteOp(_Op):
    op: Literal["delete"]


class IncrementOp(_Op):
    """Add `amount` (not 0; negative subtracts) to a counter field."""

    op: Literal["increment"]
    field: _Name
    amount: Annotated[int, Field(strict=True)] | Annotated[float, Field(strict=True)]


class MembersOp(_Op):
    """Add members to, or remove them from, a set field."""

    op: Literal["add", "remove"]
    field: _Name
    members: Annotated[list[Annotated[str, Field(strict=True)]],
                       Field(min_length=1, max_length=1000)]


TxnOp = Annotated[PutOp | DeleteOp | IncrementOp | MembersOp, Field(discriminator="op")]


class TxnBody(BaseModel):
    """Operations written together or not at all (docs/TRANSACTIONS.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ops: Annotated[list[TxnOp], Field(min_length=1, max_length=MAX_TXN_OPS)]
    priority: Priority = 0


class TxnOut(BaseModel):
    """A committed transaction: every write saved locally, pending sync together."""

    model_config = ConfigDict(extra="forbid")

    results: list[WriteResultOut]
    """One per operation, in order ("unchanged" for one that had nothing to write)."""
    change_ids: list[str]
    message: str


def run(agent: Agent, body: TxnBody, once: Once | None = None) -> list[WriteResult]:
    """Record every operation, then commit; a refused one names its index."""
    tx = agent.transaction(priority=body.priority, once=once)
    try:
        with tx:
            for index, op in enumerate(body.ops):
                try:
                    _record(tx, op)
                except AgentError as exc:
                    raise _at(index, exc) from None
    except AgentError as exc:  # refused at the commit: by the operation at failed_at
        if tx.failed_at is None:
            raise
        raise _at(tx.failed_at, exc) from None
    return tx.results


def _record(tx: Any, op: PutOp | DeleteOp | IncrementOp | MembersOp) -> None:
    if isinstance(op, PutOp):
        tx.put(op.collection, op.key, op.fields)
    elif isinstance(op, DeleteOp):
        tx.delete(op.collection, op.key)
    elif isinstance(op, IncrementOp):
        tx.increment(op.collection, op.key, op.field, op.amount)
    elif op.op == "add":
        tx.add(op.collection, op.key, op.field, op.members)
    else:
        tx.remove(op.collection, op.key, op.field, op.members)


def _at(index: int, exc: AgentError) -> ApiError:
    err = from_agent_error(exc)
    # A collection named in the body (not the URL) that the schema lacks is bad input.
    status = 422 if err.code == "unknown_collection" else err.status
    return ApiError(status, err.code, f"ops.{index}: {err.message}; nothing was written")


async def post_txn(request: web.Request, ctx: Any) -> web.StreamResponse:
    body = await inputs.body(request, TxnBody)
    for collection in {op.collection for op in body.ops}:
        inputs.need_write(request, collection)
    try:
        results: list[WriteResult] = await ctx.blocking(
            partial(run, ctx.agent, body, idem.once(request, answer)))
    except ApiError:
        raise
    except AgentError as exc:
        err = from_agent_error(exc)
        raise ApiError(err.status, err.code, f"{err.message}; nothing was written") from None
    status, doc = answer(results)
    if status == 202:
        ctx.hub.poke()
    return json_response(doc, status=status)


def answer(results: list[WriteResult]) -> tuple[int, dict[str, Any]]:
    """A transaction's answer (what an Idempotency-Key replays)."""
    ids = [r.change_id for r in results if r.change_id is not None]
    if len(ids) > 1:
        message = (f"saved locally as one transaction (changes {ids[0]} to {ids[-1]}), "
                   "pending sync")
    elif ids:
        message = f"saved locally (change {ids[0]}), pending sync"
    else:
        message = "nothing to change"
    doc = {"results": [r.to_dict() for r in results], "change_ids": ids, "message": message}
    return (202 if ids else 200), doc


__all__ = ["TxnBody", "TxnOp", "TxnOut", "answer", "post_txn", "run"]
