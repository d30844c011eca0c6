"""`python -m gspn_gen.sweep`: per-scale samples and metrics, sweep.json, the PNG, resume and refusals; every
scale is a request of the sampling library (no command line built, no exit inside it)."""

import json

import numpy as np
import pytest
import torch

from gspn_gen import sweep
from gspn_gen.sweep import main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained tiny model saved as a training checkpoint: the sweep's mechanics need no training."""
    from gspn_gen.lit import GenerationModule

    torch.manual_seed(0)
    module = GenerationModule(model="GSPN-T/2", model_args={"hidden_size": 32, "depth": 2, "num_heads": 2},
                              input_size=8)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


def _sweep(checkpoint, out, *extra):
    return main(["--ckpt", str(checkpoint), "--num-samples", "30", "--steps", "2", "--ref", "digits:val",
                 "--extractor", "digits", "--device", "cpu", "--no-progress", "--cache-dir", str(out / "cache"),
                 "--out", str(out), *extra])


def test_sweep_writes_json_png_and_best_scale_then_resumes(checkpoint, tmp_path, capsys, monkeypatch):
    from PIL import Image

    assert _sweep(checkpoint, tmp_path, "--cfg-scale", "1", "3") == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "sweep.json").read_text())
    rows = summary["scales"]
    assert [r["cfg_scale"] for r in rows] == [1.0, 3.0]
    assert all({"fid", "isc_mean", "precision", "recall", "class_agreement"} <= set(r) for r in rows)
    best = min(rows, key=lambda r: r["fid"])
    assert summary["best"] == {"cfg_scale": best["cfg_scale"], "fid": best["fid"]}
    assert f"best guidance scale for FID: {best['cfg_scale']:g}" in out
    assert summary["protocol"] == "torch-fidelity" and summary["extractor"]["name"] == "digits"
    with Image.open(tmp_path / "sweep.png") as png:
        assert png.format == "PNG" and png.width > 2 * png.height  # three panels side by side
    samples = np.load(tmp_path / "cfg-3" / "samples.npz")
    assert samples["arr_0"].shape == (30, 8, 8, 3)

    # Rerun with one more scale: the two scored ones are read back, only the new one is sampled.
    sampled = []
    real = sweep.sample
    monkeypatch.setattr(sweep, "sample", lambda request, module: sampled.append(request.cfg_scale) or
                        real(request, module))
    assert _sweep(checkpoint, tmp_path, "--cfg-scale", "1", "2", "3") == 0
    assert sampled == [2.0]
    assert [r["cfg_scale"] for r in json.loads((tmp_path / "sweep.json").read_text())["scales"]] == [1.0, 2.0, 3.0]

    # Other settings in the same folder are refused in one line.
    capsys.readouterr()
    assert _sweep(checkpoint, tmp_path, "--cfg-scale", "1", "--seed", "5") == 2
    err = capsys.readouterr().err
    assert "holds a sweep made with other settings" in err and "'seed': (0, 5)" in err and err.count("\n") == 1
    assert "--overwrite" in err

    # --overwrite replaces that sweep: the other settings' results go, none is read back as this one's.
    assert _sweep(checkpoint, tmp_path, "--cfg-scale", "1", "--seed", "5", "--overwrite") == 0
    summary = json.loads((tmp_path / "sweep.json").read_text())
    assert summary["settings"]["seed"] == 5 and [r["cfg_scale"] for r in summary["scales"]] == [1.0]
    assert not (tmp_path / "cfg-3" / "metrics.json").exists() and not (tmp_path / "cfg-3" / "samples.npz").exists()


def test_sweep_refuses_a_folder_of_other_files(checkpoint, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert _sweep(checkpoint, tmp_path, "--cfg-scale", "1") == 2
    assert "holds files but no sweep" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_sweep_refuses_bad_scales(checkpoint, tmp_path, capsys):
    assert _sweep(checkpoint, tmp_path, "--cfg-scale", "2", "nan") == 2
    assert "--cfg-scale must be between 0 and 100 (1: no guidance, 0: unconditional), got nan" in \
        capsys.readouterr().err
    assert not (tmp_path / "sweep_settings.json").exists()


def test_sweep_passes_guide_channels_to_sampling_and_refuses_another_on_resume(checkpoint, tmp_path, capsys,
                                                                                 monkeypatch):
    requests = []
    real = sweep.sample
    monkeypatch.setattr(sweep, "sample", lambda request, module: requests.append(request) or real(request, module))
    assert _sweep(checkpoint, tmp_path, "--cfg-scale", "3", "--guide-channels", "1", "--metrics", "fid") == 0
    assert [r.guide_channels for r in requests] == [1]
    assert json.loads((tmp_path / "sweep.json").read_text())["settings"]["guide_channels"] == 1
    assert json.loads((tmp_path / "sweep_settings.json").read_text())["guide_channels"] == 1

    capsys.readouterr()
    assert _sweep(checkpoint, tmp_path, "--cfg-scale", "3", "--metrics", "fid") == 2
    err = capsys.readouterr().err
    assert "error:" in err and "'guide_channels': (1, None)" in err and err.count("\n") == 1
    assert len(requests) == 1

    fresh = tmp_path / "fresh"  # more channels than the model has: refused before anything is recorded
    for channels in ("2", "0"):
        assert _sweep(checkpoint, fresh, "--cfg-scale", "3", "--guide-channels", channels, "--metrics", "fid") == 2
        assert f"--guide-channels {channels}: expected 1 to 1 (the model's latent channels)" in capsys.readouterr().err
    assert not (fresh / "sweep_settings.json").exists() and len(requests) == 1
