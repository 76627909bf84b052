"""Handlers of `waystation agent deadletters show|retry|discard N` (one dead letter).

(`agent deadletters [list]` is `agent.cli.cmd_deadletters`.) A device's dead letters are
its own changes the server refused for good; each was rolled back locally. N is the
change number (the part after the colon of the change id ``van-1:17``).

- retry: the change is checked against the current collection schema and this device's
  scopes, then queued again as a NEW change (new change number, new stamp: the server
  remembers its answer to the old number and would only repeat it); the dead letter is
  removed in the same local transaction. Use it after the cause was fixed (a schema or
  rule changed on the server, the device got the scope).
- discard: the dead letter is dropped for good; the change stays rolled back (this
  device's view keeps the server's value).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping

import orjson

from agent.cli import _open, change_fields
from agent.errors import BadRequest, NotFound
from agent.models import DeadLetter
from waystation.timefmt import iso


def _number(text: object) -> int:
    raw = str(text)
    raw = raw.rpartition(":")[2]  # accept the change id form "van-1:17" too
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise BadRequest("invalid", f"{text!r} is not a change number (the N of a change id "
                                    "DEVICE:N from `waystation agent deadletters list`)")
    return n


def _not_found(n: int) -> NotFound:
    return NotFound(f"no dead letter with change number {n} on this device (see "
                    "`waystation agent deadletters list`)")


def _hinted(exc: NotFound, n: int) -> NotFound:
    """The API's "no dead letter" with the command that lists them, as `show` says it."""
    return _not_found(n) if str(exc).startswith("no dead letter") else exc


def _find(letters: list[DeadLetter], n: int) -> DeadLetter:
    for letter in letters:
        if letter.n == n:
            return letter
    raise _not_found(n)


def cmd_deadletters_show(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`agent deadletters show N [--json]`"""
    n = _number(args.n)
    with _open(args, env, create=False) as agent:
        letter = _find(agent.dead_letters(), n)
    if args.json:
        print(orjson.dumps(letter.to_dict(), option=orjson.OPT_INDENT_2).decode())
        return 0
    ch = letter.change
    print(f"change {letter.change_id}: {ch.get('op')} {ch.get('c')}/{ch.get('k')} "
          f"(scope {ch.get('s')})")
    print(f"refused: {letter.code}: {letter.reason}")
    print(f"written {_iso(letter.created_ms)}, refused {_iso(letter.rejected_ms)}")
    for label, name, value in change_fields(ch):
        print(f"  {label} {name}: {value}")
    print(f"retry with `waystation agent deadletters retry {n}`, or drop it with "
          f"`waystation agent deadletters discard {n}`")
    return 0


def cmd_deadletters_retry(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`agent deadletters retry N [--json]`: queue the change again as a new one."""
    n = _number(args.n)
    with _open(args, env, create=False) as agent:
        try:
            result = agent.retry_dead_letter(n)
        except NotFound as exc:
            raise _hinted(exc, n) from None
    if args.json:
        print(orjson.dumps({"retried": n, **result.to_dict()},
                           option=orjson.OPT_INDENT_2).decode())
        return 0
    if result.state == "unchanged":
        print(f"dead letter {n} removed: {result.message} (the record already holds it)")
    else:
        print(f"dead letter {n} queued again as change {result.change_id}: saved locally, "
              "pending sync")
    return 0


def cmd_deadletters_discard(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`agent deadletters discard N [--json]`: drop it for good."""
    n = _number(args.n)
    with _open(args, env, create=False) as agent:
        try:
            agent.discard_dead_letter(n)
        except NotFound as exc:
            raise _hinted(exc, n) from None
    if args.json:
        print(orjson.dumps({"discarded": n}).decode())
        return 0
    print(f"dead letter {n} discarded: the change stays rolled back and is not sent again")
    return 0


def _iso(ms: int) -> str:
    return iso(ms) or "-"


__all__ = ["cmd_deadletters_discard", "cmd_deadletters_retry", "cmd_deadletters_show"]
