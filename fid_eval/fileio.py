"""Crash-safe file writes: a reader (or a killed run's resume) sees the old file or the new one, never half.

The project's one atomic writer. It lives in fid_eval, the lowest package that writes files, so that the
evaluation suite needs nothing of the generator; the generator imports it as `gspn_gen.fileio`.
Every writer in the project goes through `atomic_write`: the bytes go to a temp name in the target's own
directory (so the final rename never crosses a filesystem, whatever $TMPDIR is), are flushed and
fsynced, renamed over the target with `os.replace`, and the directory is fsynced so the rename itself
survives a power cut. On any error the temp file is removed and the target is left as it was.

    with atomic_write("out/metrics.csv", "w") as f:      # text; "wb" (default) for bytes
        f.write(text)
    with atomic_write(path) as f:                         # any library that writes to a file object
        torch.save(obj, f)  /  np.savez(f, arr_0=a)  /  image.save(f, format="PNG")
    write_json(path, obj)                                 # strict JSON: NaN/inf raise ValueError
    write_text(path, text); write_bytes(path, data)

Temp files are named `.<target name>.<pid>.<8 hex>.tmp`. A run killed mid-write leaves one behind;
`remove_stale_temps(directory)` deletes those of processes that no longer exist (only this pattern).

Before a long job writes its result, `check_output` refuses a path that exists (unless the caller
allows overwriting it) or whose directory cannot be written, and `free_bytes` / `available_memory`
say what the result can take; the messages name the path and the flag to use.
Stdlib only.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO

_TEMP = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


def temp_name(path: str | os.PathLike) -> Path:
    """A fresh temp path beside `path` in the pattern `remove_stale_temps` recognises."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename in `directory` durable; filesystems that cannot fsync a directory are skipped."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def staged_write(path: str | os.PathLike, mode: str = "wb", encoding: str | None = "utf-8") -> Iterator[tuple[IO, Path]]:
    """Open a temp file beside `path` for writing ("wb" or "w"), yielding (file, temp path); on success the temp
    file is complete and fsynced but not yet in place: `publish(temp, path)` puts it there (on an error it is
    removed). For a writer that must decide later when the new file becomes visible."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, mode, **({} if mode == "wb" else {"encoding": encoding, "newline": ""})) as f:
            yield f, tmp
            f.flush()
            os.fsync(f.fileno())
    except BaseException:  # also KeyboardInterrupt: never leave the temp file behind
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename a finished temp file over `path` durably; on an error the temp file is removed."""
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(Path(path).parent)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temp file beside `path` for writing ("wb" or "w"); on success it replaces `path` durably.

    The parent directory is created if needed. The new file's permissions follow the umask, like `open`.
    """
    with staged_write(path, mode, encoding) as (f, tmp):
        yield f
    publish(tmp, path)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def write_json(path: str | os.PathLike, obj) -> None:
    """Write `obj` as indented, strict JSON (NaN or inf raise ValueError before anything is written)."""
    write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


class OutputError(ValueError):
    """An output path cannot or may not be written; the message names it and what to do."""


def check_writable_dir(directory: str | os.PathLike, what: str = "--out") -> None:
    """Create `directory` if needed and prove a file can be created in it (a real probe: permissions,
    read-only mounts, a path through a file); OutputError otherwise."""
    probe = temp_name(Path(directory) / "probe")
    try:
        probe.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as e:
        raise OutputError(f"{what}: cannot write into {str(directory)!r} ({e.strerror or e})") from None
    with contextlib.suppress(OSError):
        probe.unlink()


def check_output(path: str | os.PathLike, overwrite: bool, what: str = "--out", flag: str = "--overwrite") -> None:
    """Refuse an existing `path` unless `overwrite`, and an output directory that cannot be written."""
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise OutputError(f"{what} {str(path)!r} exists; pass {flag} to replace it, or choose another path")
    if path.is_dir():
        raise OutputError(f"{what} {str(path)!r} is a directory, not a file")
    check_writable_dir(path.absolute().parent, what)


def free_bytes(directory: str | os.PathLike) -> int:
    """Bytes free for this user on the filesystem holding `directory` (or its nearest existing parent)."""
    directory = Path(directory).absolute()
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    return shutil.disk_usage(directory).free


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def format_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            break
        n /= 1000
    return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else
        return True
    return True


def remove_stale_temps(directory: str | os.PathLike, target: str | None = None) -> list[Path]:
    """Delete temp files left in `directory` by killed writers (our pattern, writer process gone).

    With `target` (a file name) only the temp files of that file are considered.
    """
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            m = _TEMP.match(entry.name)
            if (m and (target is None or m["target"] == target) and entry.is_file(follow_symlinks=False)
                    and not _pid_alive(int(m["pid"]))):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed
