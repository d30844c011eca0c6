"""benchmarks/fault_drill.py in the suite: its fastest kill drill, run for real (kill -9 in a checkpoint write)."""

from __future__ import annotations

from benchmarks import fault_drill as drill


def test_kill_in_a_checkpoint_write_with_tmpdir_elsewhere_resumes_exactly(tmp_path):
    d = drill.Drill(tmp_path, steps=6, other_fs_first=True)
    runs, failures = drill.drill_kill_in_write(d, 1)
    # invariants: the killed write left a temp file, the previous last.ckpt loads, `--ckpt_path last` resumes to
    # the weights of the unbroken run, metrics.csv has every step, no temp file is left in the run or TMPDIR
    assert runs == 1 and failures == []
