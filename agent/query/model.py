"""A query as plain data: a pydantic model that round-trips through JSON unchanged, so the
same object travels from an app over the local HTTP API to the agent.

    {"collection": "tasks",
     "where": {"route": "route-42", "status": {"in": ["out", "pending"]},
               "eta": {"gte": 1750000000000, "lt": 1750086400000}},
     "order_by": "eta", "desc": false, "limit": 50, "after": null,
     "include_deleted": false}

`where` maps a field (or ``$scope``) to a value (equality) or to operators: ``eq``,
``in`` (a list), ``gt``/``gte``/``lt``/``lte`` (a range), ``prefix`` (strings); the
operators of one field and the fields are all combined with AND. Values are JSON
scalars. What the operators match, and which indexes a query needs, is in
docs/QUERIES.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from agent.models import Record
from agent.query.errors import QueryError
from schemas.wire import COLLECTION_PATTERN
from waystation.filters import (
    FILTER_FIELD_PATTERN,
    MAX_CONDITIONS,
    RANGE_OPS,
    FieldFilter,
    shorthand,
)

MAX_LIMIT = 1000
"""Records per page at most (a cursor fetches the next page)."""
DEFAULT_LIMIT = 100
MAX_CURSOR_CHARS = 16384
QUERY_FIELD_PATTERN = FILTER_FIELD_PATTERN


class Query(BaseModel):
    """One query on one collection (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    collection: str = Field(pattern=COLLECTION_PATTERN)
    where: dict[Annotated[str, Field(pattern=QUERY_FIELD_PATTERN)], FieldFilter] = Field(
        default_factory=dict, max_length=MAX_CONDITIONS)
    order_by: Annotated[str, Field(pattern=QUERY_FIELD_PATTERN)] | None = None
    desc: StrictBool = False
    """Descending order (needs order_by)."""
    limit: StrictInt = Field(default=DEFAULT_LIMIT, ge=1, le=MAX_LIMIT)
    after: str | None = Field(default=None, max_length=MAX_CURSOR_CHARS)
    """The `next` cursor of the previous page."""
    include_deleted: StrictBool = False

    @field_validator("where", mode="before")
    @classmethod
    def _shorthand(cls, raw: Any) -> Any:
        return shorthand(raw)

    @model_validator(mode="after")
    def _desc_needs_order(self) -> Query:
        if self.desc and self.order_by is None:
            raise ValueError("desc needs order_by (the field to order by)")
        return self

    def to_json_dict(self) -> dict[str, Any]:
        """The query as JSON (what `Query.model_validate` reads back)."""
        return {"collection": self.collection,
                "where": {name: flt.ops() for name, flt in self.where.items()},
                "order_by": self.order_by, "desc": self.desc, "limit": self.limit,
                "after": self.after, "include_deleted": self.include_deleted}


def make_query(query: Query | Mapping[str, Any] | str, **options: Any) -> Query:
    """A `Query` from a Query, a JSON-like dict, or a collection name plus keyword
    options (where, order_by, desc, limit, after, include_deleted); a malformed one
    raises QueryError naming what is wrong."""
    given = {k: v for k, v in options.items() if v is not None}
    try:
        if isinstance(query, Query):
            return Query.model_validate({**query.to_json_dict(), **given}) if given else query
        if isinstance(query, str):
            return Query.model_validate({"collection": query, **given})
        if isinstance(query, Mapping):
            return Query.model_validate({**query, **given})
    except ValidationError as exc:
        raise QueryError(f"invalid query: {_first_error(exc)}") from None
    raise QueryError(f"a query is a Query, a dict or a collection name, not "
                     f"{type(query).__name__}")


_BRANCHES = frozenset({"bool", "int", "float", "str", "constrained-str", "none"})


def _first_error(exc: ValidationError) -> str:
    """One line for the most telling error: a broken constraint (too long, not finite)
    before "not a bool / int / str" from each branch of the scalar union."""
    errors = exc.errors()
    specific = [e for e in errors if not str(e["type"]).endswith("_type")]
    err = specific[0] if specific else errors[0]
    parts = [str(p) for p in err["loc"] if p not in _BRANCHES]
    loc = ".".join(parts)
    msg = str(err["msg"]).removeprefix("Value error, ")
    if not specific and len(errors) > 1:
        msg = "must be a JSON scalar (null, true/false, a number or a string)"
    return f"{loc}: {msg}" if loc else msg


@dataclass(frozen=True)
class QueryPage:
    """One page of a query's result."""

    records: list[Record]
    next: str | None
    """Cursor for the next page (pass it as `after`); None on the last page."""
    index: str | None
    """The index that served the query (its fields joined by commas); None when the
    records were read in key order without one."""

    def to_dict(self) -> dict[str, Any]:
        return {"records": [r.to_dict() for r in self.records], "next": self.next,
                "index": self.index}


@dataclass(frozen=True)
class LiveUpdate:
    """A live query's result changed (or, `initial`, its first result).

    `keys` is the whole result now, in order; `entered` the records that came in,
    `changed` those still in it whose fields or sync state changed, `left` the keys of
    those that went out (changed so they no longer match, deleted, or pushed past the
    limit).
    """

    seq: int
    """The feed position (`Agent.feed_position`) the result reflects."""
    initial: bool
    keys: list[str]
    entered: list[Record] = field(default_factory=list)
    changed: list[Record] = field(default_factory=list)
    left: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


__all__ = [
    "DEFAULT_LIMIT",
    "MAX_LIMIT",
    "RANGE_OPS",
    "FieldFilter",
    "LiveUpdate",
    "Query",
    "QueryPage",
    "make_query",
]
