"""FID-during-training curves: the eval rows of a metrics.csv read back by step, plotted through the one writer."""

from __future__ import annotations

import importlib

import pytest

from gspn_gen.report import plot_curves, read_evals


def test_eval_rows_are_read_by_step_and_plotted_without_leftovers(tmp_path):
    (tmp_path / "metrics.csv").write_text(
        "step,train/loss,eval/fid,eval/class_agreement,eval/seconds\n"
        "499,0.5,,,\n"
        "499,,9.0,0.4,2.5\n"
        "249,,11.0,0.1,3.0\n"
    )
    evals = read_evals(tmp_path)
    assert evals == [{"step": 249, "fid": 11.0, "class_agreement": 0.1, "seconds": 3.0},
                     {"step": 499, "fid": 9.0, "class_agreement": 0.4, "seconds": 2.5}]
    pytest.importorskip("matplotlib")
    plot_curves({"demo": evals}, tmp_path / "curve.png", "demo")
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curve.png", "metrics.csv"]


@pytest.mark.parametrize("script", ["distill_digits", "training_curves"])
def test_benchmark_scripts_import_as_modules(script):
    assert callable(importlib.import_module(f"benchmarks.{script}").main)
