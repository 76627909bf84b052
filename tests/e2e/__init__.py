"""End-to-end tests: real broker, server and agent processes over TCP, LMDB on disk."""
