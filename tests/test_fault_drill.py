"""benchmarks/fault_drill.py in the suite: its fastest kill drill, run for real (kill -9 in a checkpoint write)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_drill():
    """The drill script as a module (benchmarks/ is not a package)."""
    if "fault_drill" not in sys.modules:
        spec = importlib.util.spec_from_file_location("fault_drill", REPO / "benchmarks" / "fault_drill.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["fault_drill"] = module
        spec.loader.exec_module(module)
    return sys.modules["fault_drill"]


def test_kill_in_a_checkpoint_write_with_tmpdir_elsewhere_resumes_exactly(tmp_path):
    drill = load_drill()
    d = drill.Drill(tmp_path, steps=6, other_fs_first=True)
    runs, failures = drill.drill_kill_in_write(d, 1)
    # invariants: the killed write left a temp file, the previous last.ckpt loads, `--ckpt_path last` resumes to
    # the weights of the unbroken run, metrics.csv has every step, no temp file is left in the run or TMPDIR
    assert runs == 1 and failures == []
