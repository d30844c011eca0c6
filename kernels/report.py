"""What a benchmark result needs beside its numbers: the machine it ran on and a crash-safe JSON file.

Standard library only, so the op package depends on nothing of the generator and any benchmark
script can use it.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
from pathlib import Path

__all__ = ["cpu_name", "machine", "slug", "write_json"]


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (else what `platform` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def slug(text: str) -> str:
    """A file-name-safe lower-case form of text: 'NVIDIA H200' -> 'nvidia-h200'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def machine(**extra) -> dict:
    """Where and when a result was measured: CPU, cores, OS, Python, date, plus the caller's fields
    (device, library versions)."""
    return {"cpu": cpu_name(), "cpu_cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "date": _dt.datetime.now().isoformat(timespec="seconds"), **extra}


def write_json(path: str | os.PathLike, obj) -> None:
    """Write obj as indented JSON: a temp file beside path, flushed to disk, then renamed into place,
    so a reader never sees half a file and a crash leaves the previous version."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
