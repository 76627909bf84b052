"""An LMDB environment opened for a conversion (`waystation.atrest.rewrite`): without the
store class (which refuses a store half-way through one), alone (no other process may
have it open), and compacted at the end.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import struct
from collections.abc import Sequence
from pathlib import Path

import lmdb

from waystation.atrest import files, rewrite


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


_FLOCK = struct.Struct("hhqqi4x")  # struct flock on Linux (64-bit off_t)


def lock_holder(lock_file: Path) -> int | None:
    """The PID of another process holding LMDB's lock on `lock_file` (byte 0, held shared
    by every process with the environment open), or None. Locks of this process do not
    count (POSIX record locks never conflict with their own process)."""
    try:
        fd = os.open(lock_file, os.O_RDWR)
    except OSError:
        return None
    try:
        query = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0)
        l_type, _, _, _, pid = _FLOCK.unpack(fcntl.fcntl(fd, fcntl.F_GETLK, query))
    except OSError:
        return None
    finally:
        os.close(fd)
    return None if l_type == fcntl.F_UNLCK or pid <= 0 else int(pid)


class RawEnv:
    """The environment at `env_dir` with its named databases (`names`, meta included).

    `fail` builds the caller's error from a message (each package raises its own)."""

    def __init__(self, env_dir: Path, names: Sequence[str], *, meta_db: str,
                 marker_key: bytes, max_map_size: int, fail: type[Exception],
                 what: str) -> None:
        self.env_dir = env_dir
        self.fail = fail
        self.what = what
        self.closed = False
        if not (env_dir / "data.mdb").exists():
            raise fail(f"no {what} at {env_dir}: nothing to convert")
        owner = env_dir.stat().st_uid
        if owner != os.geteuid():
            # The files written here (data key, compacted store) would belong to us, and
            # the service, running as the owner, could not read them.
            raise fail(f"the {what} at {env_dir} belongs to {_user(owner)}: run this as "
                       f"that user (runuser -u {_user(owner)} -- ...; pass the key on "
                       "standard input with --key-file /dev/stdin < KEYFILE)")
        try:
            self.env = lmdb.open(str(env_dir), subdir=True, max_dbs=len(names) + 2,
                                 sync=True, metasync=True, mode=0o600, create=False)
        except lmdb.Error as exc:
            raise fail(f"cannot open the {what} at {env_dir}: {exc}") from None
        try:
            self.dbs = {n: self.env.open_db(n.encode()) for n in names}
            self.target = rewrite.Env(self.env, self.dbs, meta_db, marker_key,
                                      max(max_map_size, int(self.env.info()["map_size"])))
        except lmdb.Error as exc:
            self.close()
            raise fail(f"cannot open the {what} at {env_dir}: {exc}") from None

    def meta_raw(self, key: bytes) -> bytes | None:
        with self.env.begin(db=self.dbs[self.target.meta_db]) as txn:
            raw = txn.get(key)
        return None if raw is None else bytes(raw)

    def others(self) -> list[int]:
        """PIDs of the other processes that have the store open: LMDB's reader table
        (processes that have read), and the holder of LMDB's lock on lock.mdb (every
        process that opened the environment holds it shared, until it closes it)."""
        self.env.reader_check()  # forget readers of dead processes
        pids: set[int] = set()
        holder = lock_holder(self.env_dir / "lock.mdb")
        if holder is not None:
            pids.add(holder)
        for line in self.env.readers().splitlines()[1:]:
            parts = line.split()
            if parts and parts[0].isdigit() and int(parts[0]) != os.getpid():
                pids.add(int(parts[0]))
        return sorted(pids)

    def refuse_if_shared(self, stop: str) -> None:
        others = self.others()
        if others:
            raise self.fail(
                f"the {self.what} at {self.env_dir} is open in other processes (PIDs "
                f"{', '.join(map(str, others))}): stop {stop}, then run this again")

    def compact(self) -> None:
        """Replace data.mdb with a compacted copy, which holds only the live pages: the
        pages freed by the conversion (the old values) are left behind. Closes the
        environment. A crash leaves the old file or the new one, both complete."""
        tmp = self.env_dir / "compact.tmp"
        with contextlib.suppress(FileNotFoundError):
            (tmp / "data.mdb").unlink()
        tmp.mkdir(mode=0o700, exist_ok=True)
        try:
            self.env.copy(str(tmp), compact=True)
        except lmdb.Error as exc:
            raise self.fail(f"cannot write a compacted copy of the {self.what} into {tmp} "
                            f"(free disk space, then run this again): {exc}") from None
        fd = os.open(tmp / "data.mdb", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self.close()
        os.replace(tmp / "data.mdb", self.env_dir / "data.mdb")
        files.fsync_dir(self.env_dir)
        with contextlib.suppress(OSError):
            tmp.rmdir()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.env.close()


__all__ = ["RawEnv"]
