"""A damaged store file: found before LMDB maps it, when it opens, or mid-run.

LMDB has no checksums and trusts its file: a data.mdb cut short by a power loss is
mapped as it is, and the first read past its end kills the process with SIGBUS (no
exception, no message; under systemd a restart every few seconds); a data.mdb cut to 0
bytes was taken for "no store yet" and silently replaced by an empty one, its pending
changes lost. These checks turn every damage LMDB can notice into one `StoreDamaged`
naming the file and what to do, and never write to the damaged file.

What cannot be noticed: a flipped bit inside a stored value (LMDB keeps no checksum;
an encrypted store's AES-GCM does notice it, as a decryption failure).
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lmdb

from agent.errors import StorageError, StoreDamaged

DATA_FILE = "data.mdb"
_MIN_DATA_BYTES = 2 * 4096
"""LMDB writes its two meta pages when it creates a store: a shorter data.mdb is cut
short (4096 is the smallest page size LMDB uses on Linux)."""

_CREATION_WAIT_S = 2.0
"""How long a data.mdb shorter than its header may take to get it (another process
creating the store writes both pages at once, within milliseconds)."""

DAMAGE_ERRORS: tuple[type[lmdb.Error], ...] = (
    lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.InvalidError,
    lmdb.VersionMismatchError, lmdb.BadTxnError, lmdb.PageFullError)
"""LMDB's answers that mean the file's contents are not what it wrote. (MDB_BAD_TXN
follows one of them inside a transaction; MDB_PAGE_FULL from a read is a page whose
header lies.)"""


def check_before_open(env_dir: Path) -> None:
    """Refuse a data.mdb that exists but cannot be a store, before LMDB maps it (or
    takes an empty one for a new store)."""
    data = env_dir / DATA_FILE
    try:
        st = os.stat(data)
    except FileNotFoundError:
        return  # a new store
    except OSError as exc:
        raise _unreadable(data, exc) from None
    if not stat.S_ISREG(st.st_mode):
        raise StoreDamaged(str(data), "is not a file (a directory or device took its place)")
    try:
        fd = os.open(data, os.O_RDONLY)
    except OSError as exc:
        raise _unreadable(data, exc) from None
    os.close(fd)
    if st.st_size < _MIN_DATA_BYTES:
        # Another process may be creating the store this instant: LMDB creates the file,
        # then writes its header pages under its own lock (which this check runs before).
        deadline = time.monotonic() + _CREATION_WAIT_S
        while st.st_size < _MIN_DATA_BYTES and time.monotonic() < deadline:
            time.sleep(0.05)
            st = os.stat(data)
    if st.st_size < _MIN_DATA_BYTES:
        raise StoreDamaged(str(data), f"is cut short ({st.st_size} bytes, less than the "
                           "two header pages every store has)")


def check_after_open(env: Any, env_dir: Path) -> None:
    """Refuse a data.mdb shorter than the pages its header says it holds (a truncation
    on a page boundary or not): LMDB would map it and the first read of a page past its
    end would kill the process with SIGBUS. Only the header pages are read here."""
    data = env_dir / DATA_FILE
    info, psize = env.info(), int(env.stat()["psize"])
    needed = (int(info["last_pgno"]) + 1) * psize
    size = os.stat(data).st_size
    if size < needed:
        raise StoreDamaged(str(data), f"is cut short ({size} bytes; its header says "
                           f"{needed})")


def damage_from(exc: lmdb.Error, env_dir: Path) -> StoreDamaged | None:
    """The StoreDamaged an LMDB error means, or None when it is not damage."""
    data = str(env_dir / DATA_FILE)
    if isinstance(exc, DAMAGE_ERRORS):
        return StoreDamaged(data, f"is damaged ({_short(exc)})")
    if isinstance(exc, lmdb.Error) and "Is a directory" in str(exc):
        return StoreDamaged(data, "is not a file (a directory or device took its place)")
    return None


def verify(env_dir: Path, db_names: tuple[str, ...]) -> None:
    """Walk every database's tree once (branch and leaf pages; values are not read), in
    a child process: damage LMDB can notice is found when the agent starts, not by a
    request hours later. A child, because LMDB answers some damage (a zeroed page met by
    a cursor) with a failed assertion, abort(): that ends the child, not the agent.
    Raises StoreDamaged."""
    data = str(env_dir / DATA_FILE)
    child = subprocess.run([sys.executable, "-m", "agent.store_damage", str(env_dir),
                            *db_names], capture_output=True, text=True, check=False)
    if child.returncode == 0:
        return
    if child.returncode < 0:
        raise StoreDamaged(data, "is damaged (LMDB stopped reading it: "
                           f"{_last_line(child.stderr) or signal.Signals(-child.returncode).name})")
    if child.returncode == StoreDamaged.exit_code:
        raise StoreDamaged(data, child.stdout.strip() or "is damaged")
    raise StorageError(f"the check of the local store at {env_dir} failed (exit "
                       f"{child.returncode}): {_last_line(child.stderr)}")


def _walk(env_dir: Path, db_names: tuple[str, ...]) -> int:
    """The child of `verify`: 0 when every tree reads, 6 (its detail on stdout) when
    LMDB says one is damaged."""
    try:
        env = lmdb.open(str(env_dir), readonly=True, max_dbs=len(db_names) + 2, subdir=True)
        try:
            with env.begin(write=False, buffers=True) as txn:
                for name in db_names:
                    db = env.open_db(name.encode(), txn=txn, create=False)
                    with txn.cursor(db) as cur:
                        for _key in cur.iternext(keys=True, values=False):
                            pass
        finally:
            env.close()
    except lmdb.Error as exc:
        found = damage_from(exc, env_dir)
        if found is None:
            raise
        print(found.detail)
        return StoreDamaged.exit_code
    return 0


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1].strip() if lines else ""


def _unreadable(data: Path, exc: OSError) -> StoreDamaged:
    if exc.errno in (errno.EACCES, errno.EPERM):
        return StoreDamaged(str(data), "cannot be read (permission denied)",
                            "give the agent's user read and write access to it (chown to "
                            "the service's user) and start the agent again")
    return StoreDamaged(str(data), f"cannot be read ({exc.strerror or exc})")


def _short(exc: lmdb.Error) -> str:
    # lmdb's message repeats the path: keep LMDB's code and words only.
    text = str(exc)
    return text.rsplit(": ", 2)[-2] + ": " + text.rsplit(": ", 1)[-1] \
        if text.count(": ") >= 2 else text


__all__ = ["DAMAGE_ERRORS", "check_after_open", "check_before_open", "damage_from", "verify"]


if __name__ == "__main__":
    sys.exit(_walk(Path(sys.argv[1]), tuple(sys.argv[2:])))
