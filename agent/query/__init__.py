"""Queries, indexes and live queries on the device's local store.

    model       Query / FieldFilter (plain data, JSON both ways), QueryPage, LiveUpdate
    keys        the sortable byte encoding of JSON scalars (pure)
    indexes     the store's index registry and the entries a view implies (pure)
    planner     which index and which byte ranges serve a query (pure)
    cursor      opaque page cursors (pure)
    maintain    index entries kept in the view's own transaction; build / drop on open
    executor    running a plan over LMDB cursors
    service     Queries: what Agent.query / Agent.count use
    live        LiveQuery (poll / iterate) and Subscription (a thread with a callback)
    errors      QueryError, IndexRequired, IndexNotReady, CursorInvalid

Apps use `agent.api.Agent.query`, `.count`, `.live_query` and `.subscribe`; the query
model for app developers is in docs/QUERIES.md.
"""

from agent.query.errors import CursorInvalid, IndexNotReady, IndexRequired, QueryError
from agent.query.model import FieldFilter, LiveUpdate, Query, QueryPage

__all__ = [
    "CursorInvalid",
    "FieldFilter",
    "IndexNotReady",
    "IndexRequired",
    "LiveUpdate",
    "Query",
    "QueryError",
    "QueryPage",
]
