"""Opening a device's store: the key, the LMDB environment, the identity, and finishing
a wipe that a crash interrupted (`agent.wipe`)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from agent import wipe
from agent.core import Core, Settings
from agent.errors import StoreNeedsWrite
from agent.journal import Limits
from agent.keyring import KeyEncryptionKey
from agent.query.maintain import ensure_indexes
from agent.schema_store import choose_catalog
from agent.store import Store
from schemas.collection import Catalog
from waystation.config import AgentConfig, expand_path


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def journal_limits(cfg: AgentConfig) -> Limits:
    """The acked-change journal's window and byte cap (sync.acked_journal_*)."""
    return Limits(int(cfg.sync.acked_journal_days * 86_400_000),
                  cfg.sync.acked_journal_max_mb << 20)


def key_file_path(cfg: AgentConfig, env: Mapping[str, str] | None = None) -> Path | None:
    """The operator's encryption key file (storage.encryption_key_file), expanded."""
    if cfg.storage.encryption_key_file is None:
        return None
    return expand_path(cfg.storage.encryption_key_file, os.environ if env is None else env,
                       key="storage.encryption_key_file")


class Opener:
    """Everything needed to open (and, after a wipe, re-open) one device's store."""

    def __init__(self, cfg: AgentConfig, catalog: Catalog, *, create: bool = True,
                 env: Mapping[str, str] | None = None,
                 now_ms: Callable[[], int] | None = None, build_indexes: bool = True,
                 readonly: bool = False) -> None:
        self.cfg = cfg
        self.readonly = readonly
        self.build_indexes = build_indexes
        self.catalog = catalog
        self.create = create
        self.env = env
        self.now_ms = now_ms or wall_ms

    def open(self) -> Core:
        """Open the store under cfg.data_dir (created unless `create` is false) and claim
        it for this device. A store left half-wiped by a crash is wiped to the end first."""
        if self.readonly:
            try:
                core = self._open_readonly()
            except StoreNeedsWrite:
                pass  # an upgraded agent's first open: created and migrated below
            else:
                if not wipe.is_gone(core.store):
                    return core
                core.store.close()   # half-wiped: finishing the wipe writes
        core = self._open(self.create)
        if wipe.is_gone(core.store):
            gone = core.store.read(lambda tx: tx.meta("gone")) or {}
            old = core
            core = self.wipe(old, str(gone.get("id", "")))[0]
            old.store.close()
        return core

    def wipe(self, core: Core, command_id: str) -> tuple[Core, wipe.WipeReport]:
        """Wipe `core`'s store for good and return the new, empty store's core (the caller
        closes the old one once nothing uses it any more)."""
        report, done = wipe.erase(core, command_id, key_file_path(self.cfg, self.env))
        new = self._open(True)
        wipe.finish(new, report, [d for d in done if d])
        return new, report

    def _open_readonly(self) -> Core:
        """The store opened only to read it (`agent status`): no LMDB writer lock, which
        a daemon stuck inside a write transaction (stopped, or stalled in fsync on a
        failing card) may hold for ever; its identity checked, nothing recorded."""
        store = self._store(create=False, readonly=True)
        catalog = store.read(lambda tx: choose_catalog(tx, self.catalog))
        core = Core(store, self._settings(), catalog, self.now_ms)
        try:
            core.check_identity()
        except BaseException:
            store.close()
            raise
        return core

    def _store(self, *, create: bool, readonly: bool = False) -> Store:
        cfg = self.cfg
        key_path = key_file_path(cfg, self.env)
        kek = None if key_path is None else KeyEncryptionKey.from_file(key_path)
        return Store.open(Path(cfg.data_dir), map_size_mb=cfg.storage.map_size_mb,
                          max_map_size_mb=cfg.storage.max_map_size_mb, kek=kek,
                          create=create, readonly=readonly)

    def _settings(self) -> Settings:
        cfg = self.cfg
        return Settings(device_id=cfg.device_id, scopes=tuple(cfg.scopes),
                        catchup_page=cfg.sync.catchup_page,
                        heartbeat_timeout_s=2 * cfg.sync.status_interval_s + 5,
                        plaintext_indexes=cfg.storage.plaintext_indexes,
                        schema_push=cfg.sync.schema_push,
                        quota_bytes=cfg.storage.quota_bytes,
                        journal=journal_limits(cfg))

    def _open(self, create: bool) -> Core:
        store = self._store(create=create)
        settings = self._settings()
        # The schema version taken from the server, unless the file is newer
        # (agent.schema_store); `self.catalog` stays the file's for a re-open.
        catalog = store.read(lambda tx: choose_catalog(tx, self.catalog))
        core = Core(store, settings, catalog, self.now_ms)
        if wipe.is_gone(store):
            return core  # finished by open(); claiming would be refused
        try:
            core.claim_identity()
            # The indexes the schema declares: recorded, and built (or dropped) now
            # unless the caller finishes them later (`Agent.build_indexes`).
            ensure_indexes(core, build=self.build_indexes)
        except BaseException:
            store.close()
            raise
        return core


__all__ = ["Opener", "journal_limits", "key_file_path", "wall_ms"]
