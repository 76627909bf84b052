"""Changes written under an older schema version, upcast before the merge (issue 10 §1).

`SchemaChain` holds the server's live schema history (`broker.server.schema_history`)
up to the version the server runs; `upcast(change, sv, lookup)` renames, converts,
splits and merges the change's fields as the declared migrations of every version
after `sv` say (`schemas.migrate`), so that a device offline across several versions
comes back without a dead letter. A version the history does not hold (the history is
empty, or the device ran a schema that was never published) is not upcast: the change
is judged as written, as before schema histories existed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog

from broker.server import schema_history
from broker.server.store.base import Store
from schemas.collection import Catalog
from schemas.migrate import Step, build_steps, upcast_groups
from schemas.wire import Change

log = structlog.get_logger(__name__)


class SchemaChain:
    """The live history's migrations, as steps from each version to the newest."""

    def __init__(self, versions: list[schema_history.Version]) -> None:
        self.versions = versions
        self._steps: dict[int, list[Step] | None] = {}

    @classmethod
    def load(cls, store: Store, catalog: Catalog) -> SchemaChain:
        """The chain of `store`'s live history up to `catalog.version` (the server's)."""
        with store.read() as txn:
            live = [v for v in schema_history.live_versions(txn)
                    if v.row.version <= catalog.version]
        if live and live[-1].row.version != catalog.version:
            log.warning("schema_not_in_history", version=catalog.version,
                        newest_published=live[-1].row.version,
                        hint="publish the schema file with `waystation schema publish FILE` "
                             "so that older devices' changes are upcast")
            live = []
        return cls(live)

    @property
    def oldest(self) -> int | None:
        """The oldest version whose changes can be upcast (None: no history)."""
        return self.versions[0].row.version if self.versions else None

    def steps_for(self, sv: int) -> list[Step] | None:
        """The steps from version `sv` to the newest; None when `sv` is not in the chain."""
        if sv in self._steps:
            return self._steps[sv]
        base = next((v for v in self.versions if v.row.version == sv), None)
        steps: list[Step] | None = None
        if base is not None:
            later = [(v.catalog, v.migrations) for v in self.versions if v.row.version > sv]
            steps = build_steps(base.catalog, later)
        self._steps[sv] = steps
        return steps

    def upcast(self, change: Change, sv: int, lookup: Callable[[str], Any] | None) -> Change:
        """`change` as the newest version names and types its fields (unchanged when no
        step applies); raises `MigrationError` for a value that cannot be converted."""
        steps = self.steps_for(sv)
        if not steps or change.op != "put":
            return change
        if not any(step.m.collection == change.c for step in steps):
            return change
        groups = upcast_groups({"f": change.f, "i": change.i, "a": change.a, "r": change.r},
                               change.c, steps, lookup)
        return change.model_copy(update=groups)


__all__ = ["SchemaChain"]
