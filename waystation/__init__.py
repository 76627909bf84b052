"""Waystation: offline-first, store-and-forward sync for fleets of edge devices.

The shared vocabulary lives here: the hybrid logical clock (`hlc`), the merge core
(`merge`), configuration (`config`) and the command line (`cli`). The device agent is
the `agent` package, the broker side (embedded broker and merge server) is `broker`,
and the wire and collection schemas are `schemas`.
"""

__version__ = "0.1.0"
PROTOCOL_VERSION = 1
