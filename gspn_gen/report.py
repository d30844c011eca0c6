"""What a benchmark report needs beside its numbers: the machine it ran on (for the JSON and the file
name), a log-log plot, and the FID-during-training curves a run's metrics.csv holds. The JSON itself is written with `gspn_gen.fileio.write_json`.

Standard library only (matplotlib when a plot is drawn): the GPU benchmarks import it on machines that
have little more than torch and CuPy.
"""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import re
from pathlib import Path

from gspn_gen.fileio import atomic_write

__all__ = ["cpu_name", "log_log_plot", "machine", "plot_curves", "read_evals", "slug"]


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



def log_log_plot(path: str | os.PathLike, series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str,
                 title: str, dashed: tuple[str, ...] = ()) -> bool:
    """Lines of (x, y) points, one per series label, on log2 x / log y axes, written to a PNG at `path`
    (crash-safe). Series without points are left out. False, and nothing written, without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.5))
    for label, points in series.items():
        if points:
            ax.plot(*zip(*points), marker="o", linestyle="--" if label in dashed else "-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
    return True


KEYS = {"eval/fid": "fid", "eval/class_agreement": "class_agreement", "eval/seconds": "seconds",
        "eval/cpu_seconds": "cpu_seconds"}


def read_evals(run: Path) -> list[dict]:
    """The run's evaluations, by step: [{"step", "fid", "class_agreement", "seconds", "cpu_seconds"}, ...]."""
    rows: dict[int, dict] = {}
    with open(run / "metrics.csv", newline="") as f:
        for line in csv.DictReader(f):
            if line.get("eval/fid"):
                row = rows.setdefault(int(line["step"]), {"step": int(line["step"])})
                row.update({short: float(line[key]) for key, short in KEYS.items() if line.get(key)})
    return [rows[s] for s in sorted(rows)]


def plot_curves(series: dict[str, list[dict]], path: Path, title: str) -> None:
    """Two panels, FID and class agreement against the step, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(k, y) for k, y in (("fid", "FID (lower is better)"), ("class_agreement", "class agreement"))
              if any(k in r for rows in series.values() for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 4.0), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for name, rows in series.items():
            rows = [r for r in rows if key in r]
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], "o-", label=name)
        ax.set(xlabel="training step", ylabel=label, title=f"{label.split(' (')[0]} vs step")
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
