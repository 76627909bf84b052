"""The exit codes of every `waystation` command, in one place.

`--help` (the epilog) and the operator guide print `EXIT_CODES_HELP`; handlers and the
error classes use these numbers (`WaystationError.exit_code`), so what the help promises
is what the process returns. A test checks the two agree.
"""

from __future__ import annotations

import textwrap

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_STORE = 3
EXIT_LISTEN = 4
EXIT_NOT_AVAILABLE = 5
EXIT_DAMAGED = 6
EXIT_INTERRUPTED = 130

# (code, meaning) in the order --help lists them.
EXIT_CODES: tuple[tuple[int, str], ...] = (
    (EXIT_OK, "success (a daemon stopped by SIGTERM, e.g. `systemctl stop`, too)"),
    (EXIT_ERROR, "the operation failed (refused, not found, already exists, ...)"),
    (EXIT_USAGE, "usage or configuration error (command line, config file, environment "
                 "override, argument value)"),
    (EXIT_STORE, "the store cannot be used (PostgreSQL unreachable, LMDB store unreadable, "
                 "full or of another version, held by another running agent or process, "
                 "or half-way through `encrypt`/`decrypt`)"),
    (EXIT_LISTEN, "cannot listen on a configured port (in use by another process, or not "
                  "permitted)"),
    (EXIT_NOT_AVAILABLE, "command not available in this version"),
    (EXIT_DAMAGED, "the device's local store file is damaged (truncated, overwritten, not "
                   "a file): restarting cannot help, move it aside (deploy/README.md, \"A "
                   "damaged device store\")"),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C, SIGINT)"),
)

EXIT_CODES_HELP = "exit codes:\n" + "\n".join(
    textwrap.fill(meaning, 79, initial_indent=f"  {code:<4} ", subsequent_indent=" " * 7)
    for code, meaning in EXIT_CODES)

__all__ = ["EXIT_CODES", "EXIT_CODES_HELP", "EXIT_DAMAGED", "EXIT_ERROR", "EXIT_INTERRUPTED",
           "EXIT_LISTEN", "EXIT_NOT_AVAILABLE", "EXIT_OK", "EXIT_STORE", "EXIT_USAGE"]
