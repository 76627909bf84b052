"""The schema version a device took from the server, as kept in its store (meta
`schema`, written by `agent.schema_update`), and which catalog a process opening the
store runs: the taken one, unless the schema file is newer than every version the
device ran (the operator installed it by hand)."""

from __future__ import annotations

import structlog

from agent.store import Tx
from schemas import wire
from schemas.collection import Catalog
from schemas.errors import CollectionSchemaError
from schemas.migrate_local import parse_version

log = structlog.get_logger("waystation.agent")

META_SCHEMA = "schema"
META_SCHEMAS = "schemas"


def stored_catalog(tx: Tx) -> tuple[Catalog, int] | None:
    """The schema the device took from the server, and the highest version it ran;
    None when it took none (it runs its schema file)."""
    doc = tx.meta(META_SCHEMA)
    if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
        return None
    catalog, _ = parse_version(doc["text"], f"schema version {doc.get('sv')} taken from "
                                            "the server", wire.MAX_SCHEMA_PUSH_TEXT)
    return catalog, int(doc.get("max", catalog.version))


def choose_catalog(tx: Tx, file_catalog: Catalog) -> Catalog:
    """The catalog to open the store with: the one taken from the server, unless the
    schema file is newer than every version the device ran (installed by hand)."""
    try:
        stored = stored_catalog(tx)
    except CollectionSchemaError:
        log.exception("stored_schema_unreadable")
        return file_catalog
    if stored is None or file_catalog.version > stored[1]:
        return file_catalog
    return stored[0]



def follow(tx: Tx, running: Catalog) -> Catalog | None:
    """The catalog another process switched the store to (meta `sv` moved to the taken
    version), or None: keep `running`."""
    sv = tx.meta("sv")
    if sv is None or sv == running.version:
        return None
    doc = tx.meta(META_SCHEMA)
    if not isinstance(doc, dict) or doc.get("sv") != sv or running.version > doc.get("max", 0):
        return None
    try:
        stored = stored_catalog(tx)
    except CollectionSchemaError:
        log.exception("stored_schema_unreadable")
        return None
    return None if stored is None else stored[0]


__all__ = ["META_SCHEMA", "META_SCHEMAS", "choose_catalog", "follow", "stored_catalog"]
