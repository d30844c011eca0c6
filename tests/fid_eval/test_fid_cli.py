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


def test_bad_settings_and_inputs_are_one_line_with_exit_code_2(tmp_path, capsys):
    _demo_like_samples(tmp_path / "s.npz", per_class=3)
    val = digits_source("val")
    np.savez(tmp_path / "objects.npz", arr_0=val.images[:4], arr_1=np.array([object()] * 4, dtype=object))
    np.savez(tmp_path / "labels.npz", arr_0=val.images[:30], arr_1=val.labels[:30] + 20)
    samples = ["--samples", str(tmp_path / "s.npz"), "--ref", "digits:val"]
    cases = [
        (samples + ["--num-samples", "0"], "--num-samples must be >= 1, got 0"),
        (samples + ["--num-samples", "31"], "--num-samples 31, but"),
        (samples + ["--kid-subset-size", "0"], "--kid-subset-size must be >= 2, got 0"),
        (samples + ["--kid-subsets", "0"], "--kid-subsets must be >= 1, got 0"),
        (samples + ["--prc-k", "0"], "--prc-k must be >= 1, got 0"),
        (samples + ["--isc-splits", "0"], "--isc-splits must be >= 1, got 0"),
        (samples + ["--metrics", "sfid"], "sFID needs the samples' spatial statistics"),
        (["--samples", str(tmp_path / "objects.npz"), "--ref", "digits:val"], "cannot read its arrays without unpickling"),
        (["--samples", str(tmp_path / "labels.npz"), "--ref", "digits:val"], "labels (arr_1) must be class ids 0..9"),
    ]
    for argv, message in cases:
        rc = main(argv + ["--extractor", "digits", "--device", "cpu", "--no-progress",
                          "--cache-dir", str(tmp_path / "cache")])
        captured = capsys.readouterr()
        assert rc == 2 and message in captured.err and captured.err.count("\n") == 1, (message, captured.err)
        assert captured.err.startswith("fid_eval: error:")


def test_misleading_comparisons_warn_on_stderr_and_in_json(tmp_path, capsys):
    val = digits_source("val")
    np.savez(tmp_path / "ref20.npz", arr_0=val.images[:20])
    big = np.repeat(np.repeat(val.images[:100], 2, axis=1), 2, axis=2)  # 32x32 samples, reference 16x16
    np.savez(tmp_path / "s32.npz", arr_0=big, arr_1=val.labels[:100])
    rc = main(["--samples", str(tmp_path / "s32.npz"), "--ref", str(tmp_path / "ref20.npz"), "--extractor", "digits",
               "--device", "cpu", "--no-progress", "--metrics", "fid", "--cache-dir", str(tmp_path / "cache"),
               "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    warnings = json.loads((tmp_path / "r.json").read_text())["warnings"]
    assert rc == 0 and len(warnings) == 2
    assert "the reference hold 20 images, fewer than the 64 feature dimensions" in warnings[0]
    assert "samples are 32x32 images but the reference is 16x16" in warnings[1]
    assert err.count("fid_eval: warning:") == 2


def test_an_existing_out_is_kept_unless_overwrite(tmp_path, capsys):
    for argv in (["--samples", "digits:val", "--ref", "digits:train"], ["stats", "--input", "digits:val"]):
        out = tmp_path / ("r.json" if argv[0] != "stats" else "s.npz")
        out.write_text("mine")
        rc = main([*argv, "--extractor", "digits", "--device", "cpu", "--no-progress", "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("fid_eval: error:") and "exists; pass --overwrite" in err
        assert out.read_text() == "mine"
    rc = main(["--samples", "digits:val", "--ref", "digits:train", "--extractor", "digits", "--device", "cpu",
               "--no-progress", "--metrics", "fid", "--no-cache", "--out", str(tmp_path / "r.json"), "--overwrite"])
    assert rc == 0 and "fid" in json.loads((tmp_path / "r.json").read_text())["metrics"]
