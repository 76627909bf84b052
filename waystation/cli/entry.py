"""`main`: parse the command line, run the command's handler, map errors to exit codes.

A `WaystationError` escaping a handler is printed as one line ``error: <message>`` with
the error's exit code, no traceback.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Mapping, Sequence

from waystation.cli.commands import HANDLERS, resolve_handler
from waystation.cli.exitcodes import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_LISTEN, EXIT_USAGE
from waystation.cli.parser import build_parser, leaf_parser
from waystation.cli.terminal import TerminalSafe, terminal_safe
from waystation.errors import WaystationError
from waystation.quickexit import skip_final_collections


def main(argv: Sequence[str] | None = None, *, env: Mapping[str, str] | None = None,
         handlers: Mapping[str, str] | None = None) -> int:
    """Run the `waystation` command line; returns the exit code.

    `env` defaults to os.environ; `handlers` (default HANDLERS) maps command paths to
    "module:function" handler specs.
    """
    if argv is None:
        # The process's own command line (the `waystation` command, `python -m
        # waystation`): this is its entry point, so it may skip the collector's walk at
        # exit (waystation/quickexit.py); not when called from another program.
        skip_final_collections()
    environ: Mapping[str, str] = os.environ if env is None else env
    table = HANDLERS if handlers is None else handlers
    parser = build_parser()
    try:
        try:
            args, extra = parser.parse_known_args(argv)
            if extra:
                # argparse would blame the top-level parser and print its usage; the
                # operator needs the usage of the command they typed.
                leaf_parser(parser, args.command).error(
                    f"unrecognized arguments: {' '.join(extra)}")
        except SystemExit as exc:  # --help, --version, usage errors
            return exc.code if isinstance(exc.code, int) else EXIT_USAGE
        handler = resolve_handler(args.command, table.get(args.command))
        if args.command == "demo" or args.command.endswith(" run"):
            return int(handler(args, environ))  # daemons: their own logs, unwrapped
        stdout = sys.stdout
        sys.stdout = TerminalSafe(stdout)
        try:
            return int(handler(args, environ))
        finally:
            sys.stdout = stdout
    except WaystationError as err:
        message = terminal_safe(" ".join(str(err).split())) or type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`waystation agent list | head`): not an error of ours.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return EXIT_ERROR
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            # A listener no start-up check covered: still one line and the documented code.
            print(f"error: {err.strerror or err}: a port this command listens on is taken "
                  "by another process; stop it or configure another port", file=sys.stderr)
            return EXIT_LISTEN
        # A file the command needs is missing or unreadable (wrong path, wrong user):
        # say which, in one line, instead of a traceback.
        where = f" {err.filename}" if err.filename else ""
        print(f"error: {err.strerror or err}:{where} (check the path and that this user "
              "may read/write it)", file=sys.stderr)
        return EXIT_ERROR


__all__ = ["main"]
