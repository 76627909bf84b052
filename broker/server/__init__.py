"""The merge server: engine, applier, fan-out, catch-up, presence, registry and stores."""
