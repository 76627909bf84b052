"""Errors of queries (all `agent.errors.BadRequest`: the request is what is wrong).

    BadRequest
    └── QueryError            a malformed query (unknown field, wrong type, bad combination)
        ├── IndexRequired     no index serves the filters / order; names the index to add
        ├── IndexNotReady     the index that serves it is still being built
        └── CursorInvalid     an `after` cursor that is not from this query
"""

from __future__ import annotations

from agent.errors import BadRequest


class QueryError(BadRequest):
    """A query that cannot run as asked; the message says what to change."""

    def __init__(self, message: str, code: str = "bad_query") -> None:
        super().__init__(code, message)


class IndexRequired(QueryError):
    """No index of the collection serves the query; `fields` is the index to add."""

    def __init__(self, collection: str, fields: tuple[str, ...], message: str) -> None:
        super().__init__(message, "index_required")
        self.collection = collection
        self.fields = fields


class IndexNotReady(QueryError):
    """The index serving the query is still being built (by an agent that opened the
    store with a schema declaring it)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "index_building")


class CursorInvalid(QueryError):
    """An `after` cursor that is malformed, or from another query or index."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "bad_cursor")


__all__ = ["CursorInvalid", "IndexNotReady", "IndexRequired", "QueryError"]
