"""The machine a measurement ran on, for benchmark results and their file names.

Standard library only: the GPU benchmarks import it on machines that have nothing but torch (and CuPy).
Results are written with `gspn_gen.fileio.write_json`.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
from pathlib import Path

__all__ = ["cpu_name", "machine", "slug"]


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

