"""`python -m fid_eval`: table + JSON, the `stats` subcommand, and one-line errors with exit code 2."""

import json
import subprocess
import sys

import numpy as np

from fid_eval.__main__ import main
from fid_eval.inputs import digits_source


def _demo_like_samples(path, per_class=12):
    """ADM-style samples (uint8 NHWC RGB, arr_1 labels): real val digits with mild noise."""
    val = digits_source("val")
    rng = np.random.default_rng(0)
    idx = np.concatenate([rng.choice(np.flatnonzero(val.labels == c), per_class) for c in range(10)])
    noisy = np.clip(val.images[idx].astype(int) + rng.integers(-10, 11, val.images[idx].shape), 0, 255)
    np.savez(path, arr_0=noisy.astype(np.uint8), arr_1=val.labels[idx])


def test_scores_samples_against_digits_val(tmp_path, capsys):
    _demo_like_samples(tmp_path / "samples.npz")
    rc = main(["--samples", str(tmp_path / "samples.npz"), "--ref", "digits:val", "--extractor", "digits",
               "--device", "cpu", "--cache-dir", str(tmp_path / "cache"), "--kid-subsets", "5",
               "--out", str(tmp_path / "metrics.json")])
    out = capsys.readouterr().out
    assert rc == 0
    for row in ("FID", "IS (10 splits)", "KID (5 x 120)", "precision (k=3)", "recall (k=3)", "class agreement"):
        assert row in out
    assert "comparable only with" in out
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["metrics"]["class_agreement"] > 0.9 and report["samples"]["num_images"] == 120
    assert report["extractor"]["name"] == "digits" and report["ref"]["source"] == "digits:val"


def test_stats_subcommand_then_reuse(tmp_path, capsys):
    assert main(["stats", "--input", "digits:val", "--out", str(tmp_path / "val.npz"), "--extractor", "digits",
                 "--device", "cpu", "--no-progress", "--cache-dir", str(tmp_path / "cache")]) == 0
    assert "297 images, 64-d digits-cnn-" in capsys.readouterr().out
    _demo_like_samples(tmp_path / "samples.npz", per_class=3)
    args = ["--samples", str(tmp_path / "samples.npz"), "--extractor", "digits", "--device", "cpu", "--no-progress",
            "--metrics", "fid,prc", "--out"]
    assert main(args + [str(tmp_path / "a.json"), "--ref", str(tmp_path / "val.npz")]) == 0
    assert main(args + [str(tmp_path / "b.json"), "--ref", "digits:val", "--no-cache"]) == 0
    a, b = (json.loads((tmp_path / f).read_text())["metrics"] for f in ("a.json", "b.json"))
    assert a == b


def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    np.savez(tmp_path / "noarr.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    cases = [
        (["--samples", str(tmp_path / "empty"), "--ref", "digits:val"], "no images"),
        (["--samples", str(tmp_path / "noarr.npz"), "--ref", "digits:val"], "no 'arr_0'"),
        (["--samples", "digits:val", "--ref", "digits:train", "--metrics", "fid,lpips"], "unknown metrics"),
        (["--samples", "digits:val", "--ref", "digits:train", "--device", "tpu"], "unknown device"),
    ]
    for argv, message in cases:
        rc = main(argv + ["--extractor", "digits", "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and err.count("\n") == 1 and err.startswith("fid_eval: error:")


def test_module_entry_point_runs(tmp_path):
    result = subprocess.run([sys.executable, "-m", "fid_eval", "--samples", str(tmp_path / "nothing.npz"),
                             "--ref", "digits:val"], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2 and "nothing.npz: no such file or folder" in result.stderr
    assert "Traceback" not in result.stderr
