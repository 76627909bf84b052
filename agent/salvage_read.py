"""Reading an old (moved-aside, possibly damaged) agent store for `agent salvage`.

The old store is opened READ-ONLY and without LMDB's lock file (`lock=False`): not one
byte of its directory is written, so a second look (by an operator, with `mdb_dump`, or
another salvage) finds it exactly as it was.

LMDB trusts its file: a damaged page can end the reading process with SIGBUS (a page
past the end of a truncated file) or abort() (a zeroed page met by a cursor). So the
pages are read in a child process (`python -m agent.salvage_read`, which imports lmdb
only), which prints what it read, one line per entry, flushed at once: when it dies,
every line before its death stands. The parent then starts again past the damage:

- the outbox keys are change numbers (8 bytes, big-endian), so "past the damage" is a
  number: the parent probes further numbers (1, 2, 4, ... past the last entry read)
  until a child can read from one, then looks back (halving) for the first number it
  can read from, so that a healthy page after a bad one is not skipped. What lies
  between is reported as an unreadable range of change numbers.
- values that do not decode (garbage, a failed decryption) are reported one by one.

Values are returned raw (decryption is the parent's job: the child never sees a key).
"""

from __future__ import annotations

import base64
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

_MAX_N = 1 << 53
_META_KEYS = (b"device", b"inc", b"enc", b"format", b"ctr", b"created")


@dataclass
class RawRead:
    """What the children could read of an old store."""

    meta: dict[str, bytes] = field(default_factory=dict)
    """Meta entries read (raw orjson)."""
    meta_error: str | None = None
    """Why the meta database could not be read (None: it was)."""
    entries: dict[int, bytes] = field(default_factory=dict)
    """Outbox entries: change number -> raw (possibly sealed) value."""
    lost: list[tuple[int, int]] = field(default_factory=list)
    """Ranges [first, last] of change numbers whose pages could not be read."""
    open_error: str | None = None
    """Why LMDB could not open the store at all (None: it could)."""
    children: int = 0


def read_store(env_dir: Path, *, timeout_s: float = 60.0) -> RawRead:
    """Everything of the outbox (and the meta entries salvage needs) that the pages of
    the store at `env_dir` still give, reading in child processes."""
    out = RawRead()
    lines, err = _child(env_dir, "meta", 0, timeout_s)
    out.children += 1
    for kind, key, value in lines:
        if kind == "M":
            out.meta[key.decode()] = value
    if err is not None:
        if not any(kind == "M" for kind, _, _ in lines) and err.startswith("open:"):
            out.open_error = err[len("open:"):].strip()
            return out
        out.meta_error = err
    start = 0
    while True:
        lines, err = _child(env_dir, "outbox", start, timeout_s)
        out.children += 1
        last = start - 1
        for kind, key, value in lines:
            if kind == "E":
                n = int.from_bytes(key, "big")
                out.entries[n] = value
                last = n
        if err is None:
            return out
        if err.startswith("open:") or (last < start and not _readable_from(
                env_dir, -1, timeout_s)):
            # The catalogue of databases or the outbox's root is unreadable: no probe
            # can reach anything (each would die at the same page).
            out.lost.append((max(start, 1), _MAX_N - 1))
            return out
        resume = _resume_after(env_dir, last + 1, timeout_s, out)
        if resume is None:
            out.lost.append((last + 1 if last >= 0 else 1, _MAX_N - 1))
            return out
        if resume > last + 1:
            out.lost.append((max(last + 1, 1), resume - 1))
        start = resume


def _resume_after(env_dir: Path, bad: int, timeout_s: float, out: RawRead) -> int | None:
    """The lowest change number >= `bad` from which a child reads without dying (None:
    none up to 2^53): exponential probes forward, then halving back."""
    step, fail, ok = 1, bad, None
    while bad + step < _MAX_N:
        probe = bad + step
        out.children += 1
        if _readable_from(env_dir, probe, timeout_s):
            ok = probe
            break
        fail = probe
        step *= 2
    if ok is None:
        return None
    while ok - fail > 1:
        mid = (ok + fail) // 2
        out.children += 1
        if _readable_from(env_dir, mid, timeout_s):
            ok = mid
        else:
            fail = mid
    return ok


def _readable_from(env_dir: Path, start: int, timeout_s: float) -> bool:
    return _child(env_dir, "probe", start, timeout_s)[1] is None


def _child(env_dir: Path, what: str, start: int,
           timeout_s: float) -> tuple[list[tuple[str, bytes, bytes]], str | None]:
    """Run one reading child: its lines, and None when it ended cleanly, else why not."""
    try:
        proc = subprocess.run([sys.executable, "-m", "agent.salvage_read", str(env_dir), what,
                               str(start)], capture_output=True, check=False, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout or b""
        return _parse(stdout), f"the read took over {timeout_s:.0f} s"
    lines = _parse(proc.stdout)
    if proc.returncode == 0:
        return lines, None
    text = proc.stderr.decode(errors="replace").strip().splitlines()
    if proc.returncode < 0:  # LMDB met a page past the file's end (SIGBUS) or abort()ed
        return lines, f"LMDB stopped reading it ({signal.Signals(-proc.returncode).name})"
    return lines, text[-1] if text else f"exit {proc.returncode}"


def _parse(stdout: bytes) -> list[tuple[str, bytes, bytes]]:
    out: list[tuple[str, bytes, bytes]] = []
    for line in stdout.split(b"\n"):
        parts = line.split(b" ")
        if len(parts) != 3 or parts[0] not in (b"M", b"E"):
            continue  # a line cut short by the child's death
        try:
            out.append((parts[0].decode(), base64.b64decode(parts[1], validate=True),
                        base64.b64decode(parts[2], validate=True)))
        except ValueError:
            continue
    return out


# ---------------------------------------------------------------- the child


def _emit(kind: str, key: bytes, value: bytes) -> None:
    sys.stdout.buffer.write(kind.encode() + b" " + base64.b64encode(key) + b" "
                            + base64.b64encode(value) + b"\n")
    sys.stdout.buffer.flush()  # what was read before a SIGBUS is not lost


def _walk(env_dir: str, what: str, start: int) -> int:
    import lmdb  # only here: the parent never maps the old store

    try:
        env = lmdb.open(env_dir, readonly=True, lock=False, subdir=True, max_dbs=32,
                        create=False)
    except lmdb.Error as exc:
        print(f"open: {exc}", file=sys.stderr)
        return 6
    try:
        with env.begin(write=False, buffers=False) as txn:
            name = b"meta" if what == "meta" else b"outbox"
            try:
                db = env.open_db(name, txn=txn, create=False)
            except lmdb.Error as exc:
                print(f"open: {name.decode()}: {exc}", file=sys.stderr)
                return 6
            with txn.cursor(db) as cur:
                if what == "meta":
                    for key in _META_KEYS:
                        value = cur.get(key)
                        if value is not None:
                            _emit("M", key, value)
                    return 0
                if start < 0:  # the database's root alone
                    return 0
                found = cur.set_range(start.to_bytes(8, "big"))
                if what == "probe":
                    return 0
                for key, value in _items(cur, found):
                    _emit("E", key, value)
    except lmdb.Error as exc:
        print(f"read: {exc}", file=sys.stderr)
        return 6
    finally:
        env.close()
    return 0


def _items(cur: object, found: bool) -> Iterator[tuple[bytes, bytes]]:
    if not found:
        return
    while True:
        key, value = cur.item()  # type: ignore[attr-defined]
        if len(key) == 8:
            yield bytes(key), bytes(value)
        if not cur.next():  # type: ignore[attr-defined]
            return


__all__ = ["RawRead", "read_store"]


if __name__ == "__main__":
    sys.exit(_walk(sys.argv[1], sys.argv[2], int(sys.argv[3])))
