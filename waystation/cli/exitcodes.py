"""The exit codes of every `waystation` command, in one place.

`--help` and the operator guide print `EXIT_CODES_HELP`; handlers and errors use the
constants, so what the help promises is what the process returns.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_AVAILABLE = 3
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = """\
exit codes: 0 success, 1 error, 2 usage or configuration error,
            3 command not available in this version, 130 interrupted."""

__all__ = ["EXIT_CODES_HELP", "EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_NOT_AVAILABLE",
           "EXIT_OK", "EXIT_USAGE"]
