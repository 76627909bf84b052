"""`waystation agent run`: the agent service — the local API plus a supervised sync loop.

    service process (holds service.lock)          sync process (holds sync.lock)
    ├── local API (agent.http, own thread)        └── AgentDaemon: MQTT, outbox, acks
    ├── SyncSupervisor: starts the sync process,      (agent.daemon), in its own process
    │   restarts it with backoff when it dies
    └── systemd notify / watchdog / status line

Both open the same LMDB store (multi-process safe). Whatever happens to the sync
process (a crash, kill -9, a hung MQTT library), the API keeps answering and apps keep
writing: their writes wait in the outbox and drain when the sync process is back.
"""
