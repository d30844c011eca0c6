"""One writer per run directory or output file: an exclusive lock file that names its holder.

    with RunLock(dir_lock("runs/demo"), "run directory runs/demo"):     # runs/demo/.gspn-gen.lock
        ...
    with RunLock(output_lock("samples.npz"), "output samples.npz"):     # ./.samples.npz.lock
        ...

The lock is a kernel lock (flock) on an open file, so it ends with its holder however the holder ends
(kill -9 included); the file records the holder's pid, host, start time and command line, which a
refused second writer is told. A file whose lock is free is stale (its holder died): it is taken over
and the takeover is reported. The file is removed on release. Where the filesystem has no flock, the
recorded pid and host decide: the lock of a live pid on this host, or of any other host, holds.
Stdlib only.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import os
import socket
import sys
from pathlib import Path

LOCK_NAME = ".gspn-gen.lock"


class LockHeld(RuntimeError):
    """Another live process holds the lock; the message names it."""


def dir_lock(directory: str | os.PathLike) -> Path:
    """The lock file of a run directory."""
    return Path(directory) / LOCK_NAME


def output_lock(path: str | os.PathLike) -> Path:
    """The lock file of an output file, beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def describe(holder: dict) -> str:
    """'pid 123 on host h since 2026-12-05T10:00:00: python train_gen.py fit ...' from a lock file's record."""
    command = str(holder.get("command", ""))
    command = command if len(command) <= 160 else command[:157] + "..."
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since {holder.get('started', '?')}"
            + (f": {command}" if command else ""))


class RunLock:
    """An exclusive, named lock on `path` (see the module docstring); `what` names the locked thing in errors."""

    def __init__(self, path: str | os.PathLike, what: str):
        self.path = Path(path)
        self.what = what
        self.stale: dict | None = None  # the record of a dead holder this lock took over
        self._fd: int | None = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _record(self) -> bytes:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": dt.datetime.now().isoformat(timespec="seconds"),
                           "command": " ".join([os.path.basename(sys.executable), *sys.argv])}).encode()

    def _read(self, fd: int) -> dict:
        try:
            data = os.pread(fd, 65536, 0)
            record = json.loads(data.decode()) if data.strip() else {}
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def _held(self, holder: dict) -> LockHeld:
        return LockHeld(f"{self.what} is in use by another process ({describe(holder)}; lock file {self.path})")

    def acquire(self) -> RunLock:
        """Take the lock or raise LockHeld; OSError when the lock file cannot be created at all."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this RunLock")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(100):  # a holder may remove the file between our open and our lock: try again
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read(fd)
                os.close(fd)
                raise self._held(holder) from None
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
                    raise
                return self._acquire_without_flock()
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            previous = self._read(fd)
            self.stale = previous or None
            os.ftruncate(fd, 0)
            os.pwrite(fd, self._record(), 0)
            self._fd = fd
            return self
        raise self._held({})

    def _acquire_without_flock(self) -> RunLock:
        for _ in range(100):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                try:
                    fd = os.open(self.path, os.O_RDONLY)
                except FileNotFoundError:
                    continue
                holder = self._read(fd)
                os.close(fd)
                dead = holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", 0) or 0))
                if not dead:
                    raise self._held(holder) from None
                self.stale = holder
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
                continue
            os.pwrite(fd, self._record(), 0)
            self._fd = fd
            return self
        raise self._held({})

    def release(self) -> None:
        """Remove the lock file (if it is still ours) and drop the lock."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                os.unlink(self.path)
        os.close(fd)
