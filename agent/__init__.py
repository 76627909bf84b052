"""The device agent: local store, local writes, and the storage side of syncing.

    api          Agent: the Python API for apps (put/delete/increment/add/remove, get, list,
                 watch, status, dead letters, conflicts); multi-process safe
    sync         Sync (agent.sync): what the MQTT daemon applies (acks, rejects, deltas,
                 pages, checkpoints, commands) and sends (batches, catch-up, hello, status)
    query        indexes declared in the schema, queries (Agent.query / count), live queries
    cli          handlers of `waystation agent put|get|list|delete|incr|add|remove|status|...`
    store        the LMDB adapter (databases, key/value formats, growth, full disk) and
    crypto       encryption at rest of stored values (AES-256-GCM)
    core         record-level operations inside one transaction, shared by api and sync
    base, view, changes, checkpoints, validate
                 the pure core: base records (§6), local views (§9.1), wire changes (§7.2),
                 per-scope checkpoints (§9.4), write validation; no I/O
    models, errors
                 values the API returns, and the error tree
"""
