"""`waystation agent run`: take the store's service lock, serve the local API, supervise
the sync process, talk to systemd (see `agent.service`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import structlog

from agent.api import Agent
from agent.errors import StoreDamaged
from agent.http.server import ApiServer
from agent.service.lock import acquire_service_lock
from agent.service.supervisor import SyncSupervisor
from agent.store_damage import DATA_FILE
from schemas.collection import load_catalog
from waystation.config import AgentConfig
from waystation.service import check_state_directory, run_service

log = structlog.get_logger("waystation.agent.service")


def run(cfg: AgentConfig, config_path: Path | None, *, env: Mapping[str, str]) -> int:
    """Run the agent service in the foreground until SIGTERM/SIGINT (systemd-aware)."""
    check_state_directory(cfg.data_dir, env, "agent")
    catalog = load_catalog(cfg.schema_path())
    lock = acquire_service_lock(Path(cfg.data_dir))
    try:
        agent = Agent.open(cfg, catalog, env=env)
        try:
            agent.store.verify()  # a damaged store: StoreDamaged (exit 6), never served
        except BaseException:
            agent.close()
            raise
        supervisor = SyncSupervisor(config_path, env, hung_after_s=cfg.sync.hung_after_s)
        api = ApiServer(cfg, agent, sync_running=lambda: supervisor.running)

        def start() -> None:
            api.start()
            supervisor.start()

        def stop() -> None:
            supervisor.stop()
            api.stop()
            agent.close()

        def started() -> None:
            log.info("agent_started", dev=cfg.device_id, data_dir=str(cfg.data_dir),
                     api_socket=str(api.socket_path) if api.socket_path else None,
                     api_tcp=f"{api.tcp_address[0]}:{api.tcp_address[1]}"
                     if api.tcp_address else None,
                     broker=f"{cfg.mqtt.host}:{cfg.mqtt.port}", scopes=list(cfg.scopes))

        def status() -> str:
            st = agent.status()
            sync = "sync running" if supervisor.running else "sync restarting"
            return f"{st.summary()}; {sync}; API up"

        def failed() -> StoreDamaged | None:
            if not supervisor.damaged:
                return None
            return StoreDamaged(str(agent.store.path / DATA_FILE),
                                "is damaged (the sync process met the damage while running: "
                                "its log event `store_damaged` says what LMDB found)")

        return run_service(start=start, stop=stop,
                           healthy=lambda: api.healthy and supervisor.alive,
                           status=status, env=env, on_started=started, failed=failed)
    finally:
        lock.release()


__all__ = ["run"]
