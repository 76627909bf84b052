"""A process's exit without the interpreter's last garbage collections.

When the interpreter finalizes, it clears every module and runs the cyclic garbage
collector over everything still alive: for a daemon or command that imported the whole
stack (pydantic models, aiohttp, the store), that walk alone is ~0.1-0.2 s of CPU at
every exit (0.2 s of the ~0.35 s an agent takes to stop on SIGTERM, measured with
strace). Nothing needs it: the process is ending, the OS takes the memory back, and
what must happen at exit (logging's flush, coverage's data file, a store's close) is
done before, by the code that stops the service and by atexit handlers.
"""

from __future__ import annotations

import atexit
import gc


def skip_final_collections() -> None:
    """At exit, move every object to the collector's permanent generation (`gc.freeze`,
    an atexit handler: the other handlers still run, and nothing they do needs the
    collector): finalization then collects none of them. Reference counting still frees
    what it frees; only the cycle walk is skipped. For a process's entry point only,
    never for code run inside another program."""
    atexit.register(gc.freeze)


__all__ = ["skip_final_collections"]
