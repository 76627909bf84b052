"""The server-owned collection-schema history: publish, list, roll back (issue 10 §1).

The history lives in the server store (`schemas` in LMDB, `schema_versions` in
PostgreSQL), one `SchemaVersionRow` per published version holding the TOML text as
published (its `[[migrations]]` included). The live version is the newest one not
rolled back. Publishing checks the new file against the live version with
`schemas.evolution.check_step` and refuses an uncovered breaking change. Rolling back
marks the live version rolled back (its number is never reused) and is allowed when no
device has reported running it, or when every migration it declares has an inverse
(rename, convert, split, merge).

Every operation is one store transaction, so two operators publishing at once cannot
both win: the second sees the first's version and is checked against it. Publishing and
rolling back bump the registry generation in the same transaction and rewrite the
stored records (and the deltas still waiting to be fanned out) in the live version's
names and types (`broker.server.schema_records`). The transaction takes the schema lock
exclusively first (`WriteTxn.lock_schema`): merge transactions hold it shared and check
the generation under it (`WriteTxn.guard_schema`), so no merge commits under a version
that is no longer live; a running server reloads the history and redoes the batch
(`broker.server.engine`, `broker.server.schema_push`).
"""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from dataclasses import dataclass

from broker.server import schema_records
from broker.server.store.base import ReadTxn, SchemaVersionRow, Store, WriteTxn
from schemas.collection import Catalog, parse_catalog
from schemas.errors import CollectionSchemaError, SchemaEvolutionError
from schemas.evolution import (
    Convert,
    Difference,
    Merge,
    Migration,
    Rename,
    Split,
    check_step,
    parse_migrations,
)
from schemas.migrate import build_steps

MAX_SCHEMA_TEXT = 1 << 20
"""A schema file larger than 1 MiB is refused (a fleet schema is a few KiB)."""
_INVERTIBLE = (Rename, Convert, Split, Merge)


@dataclass(frozen=True, slots=True)
class Version:
    """One parsed version of the history."""

    row: SchemaVersionRow
    catalog: Catalog
    migrations: tuple[Migration, ...]


@dataclass(frozen=True, slots=True)
class Published:
    version: int
    previous: int | None
    differences: list[Difference]
    records: int = 0
    """Stored records rewritten in the new version's names and types."""


def parse_text(text: str, source: str) -> tuple[Catalog, tuple[Migration, ...]]:
    """A schema file's text -> (catalog, its migrations); errors name `source`."""
    if len(text) > MAX_SCHEMA_TEXT:
        raise CollectionSchemaError(
            f"{source}: {len(text)} characters; a schema file may hold at most "
            f"{MAX_SCHEMA_TEXT}")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CollectionSchemaError(f"{source}: not valid TOML ({exc})") from None
    return parse_catalog(data, source), parse_migrations(data.get("migrations"), source)


def read_file(path: str) -> str:
    """The text of a schema file (UTF-8, bounded); errors say what to fix."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_SCHEMA_TEXT + 1)
    except OSError as exc:
        raise CollectionSchemaError(
            f"{path}: cannot read the collection schema ({exc.strerror})") from None
    if len(raw) > MAX_SCHEMA_TEXT:
        raise CollectionSchemaError(
            f"{path}: larger than {MAX_SCHEMA_TEXT} bytes; is this the schema file?")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CollectionSchemaError(f"{path}: not UTF-8 text") from None


def rows(txn: ReadTxn) -> list[SchemaVersionRow]:
    return sorted(txn.schema_versions(), key=lambda r: r.version)


def live_versions(txn: ReadTxn) -> list[Version]:
    """The versions not rolled back, oldest first, parsed."""
    out = []
    for row in rows(txn):
        if row.rolled_back_ms:
            continue
        catalog, migrations = parse_text(row.text, f"published version {row.version}")
        out.append(Version(row, catalog, migrations))
    return out


def current(store: Store) -> Version | None:
    """The live version (newest not rolled back), or None when nothing was published."""
    with store.read() as txn:
        versions = live_versions(txn)
    return versions[-1] if versions else None


def publish(store: Store, text: str, source: str, now_ms: int) -> Published:
    """Check `text` against the live version and store it as the new live version."""
    catalog, migrations = parse_text(text, source)  # fail before opening a transaction

    def run(txn: WriteTxn) -> Published:
        txn.lock_schema()  # first: waits for merges in flight, the next ones wait for us
        every = rows(txn)
        highest = max((r.version for r in every), default=0)
        live = live_versions(txn)
        previous = live[-1] if live else None
        if catalog.version <= highest:
            used = "was rolled back" if any(
                r.version == catalog.version and r.rolled_back_ms for r in every) else \
                "is already published"
            raise SchemaEvolutionError(
                f"{source}: version {catalog.version} {used}; the next version must be "
                f"above {highest}: set version = {highest + 1}")
        if previous is None:
            if migrations:
                raise SchemaEvolutionError(
                    f"{source}: the first published version cannot declare migrations "
                    "(there is no previous version to migrate from); remove [[migrations]]")
            differences: list[Difference] = []
        else:
            differences = check_step(previous.catalog, catalog, migrations)
        txn.put_schema_version(SchemaVersionRow(catalog.version, now_ms, source, text))
        txn.bump_registry()  # running servers reload the history (broker.server.schema_push)
        records = 0
        if previous is not None and migrations:
            steps = build_steps(previous.catalog, [(catalog, migrations)])
            records = schema_records.rewrite(txn, steps, up=True)
            schema_records.rewrite_notices(txn, steps)
        return Published(catalog.version, previous.row.version if previous else None,
                         differences, records)

    return store.transact(run)


def rollback(store: Store, now_ms: int) -> tuple[int, int]:
    """Roll the live version back to the one before it; returns (from, to)."""

    def run(txn: WriteTxn) -> tuple[int, int]:
        txn.lock_schema()
        live = live_versions(txn)
        if len(live) < 2:
            raise SchemaEvolutionError(
                "nothing to roll back to: the history has "
                f"{'no live version' if not live else 'only version ' + str(live[0].row.version)}"
                "; publish the version you want instead")
        top, below = live[-1], live[-2]
        ran = sorted(d.id for d in txn.devices() if d.sv >= top.row.version)
        blocking = [m for m in top.migrations if not isinstance(m, _INVERTIBLE)]
        if ran and blocking:
            shown = ", ".join(ran[:5]) + (f" and {len(ran) - 5} more" if len(ran) > 5 else "")
            raise SchemaEvolutionError(
                f"version {top.row.version} cannot be rolled back: devices have run it "
                f"({shown}) and its migration {blocking[0].op!r} on "
                f"{blocking[0].collection!r} has no inverse; publish a version "
                f"{max(r.version for r in rows(txn)) + 1} that restores what you need")
        txn.put_schema_version(SchemaVersionRow(top.row.version, top.row.published_ms,
                                                top.row.source, top.row.text, now_ms))
        txn.bump_registry()  # running servers go back to `below` and tell devices
        if top.migrations:
            steps = build_steps(below.catalog, [(top.catalog, top.migrations)])
            schema_records.rewrite(txn, steps, up=False)
            schema_records.rewrite_notices(txn, steps)
        return top.row.version, below.row.version

    return store.transact(run)


def steps_since(versions: Sequence[Version], since: int) -> tuple[Catalog | None,
                                                                  list[Version]]:
    """The live version a device on `since` runs (None: not in the history) and the
    versions after it."""
    base = next((v for v in versions if v.row.version == since), None)
    return (base.catalog if base else None,
            [v for v in versions if v.row.version > since])


__all__ = [
    "MAX_SCHEMA_TEXT",
    "Published",
    "Version",
    "current",
    "live_versions",
    "parse_text",
    "publish",
    "read_file",
    "rollback",
    "rows",
    "steps_since",
]
