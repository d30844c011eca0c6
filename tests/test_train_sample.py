"""End to end on CPU: LightningCLI training on the digits, resume, NaN stop, sampling from the checkpoint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from gspn_gen import sample_cli, train_cli
from gspn_gen.checkpoints import read_checkpoint
from gspn_gen.sampling import run as sampling_run

REPO = Path(__file__).resolve().parents[1]


def write_config(tmp_path: Path, max_steps: int, every: int = 1, **model) -> Path:
    """A tiny but complete training config (2-layer GSPN, 8x8 digits) writing into tmp_path."""
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": max_steps, "default_root_dir": str(tmp_path),
            "limit_train_batches": 2, "limit_val_batches": 0, "log_every_n_steps": 1,
            "enable_progress_bar": False, "enable_model_summary": False, "gradient_clip_val": 1.0,
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"dirpath": str(tmp_path), "save_top_k": 0, "save_last": True,
                                         "every_n_train_steps": every}}],
        },
        "model": {"model": "GSPN-T/2", "model_args": {"hidden_size": 32, "depth": 2, "num_heads": 2},
                  "optim": {"lr": 1e-3, "warmup_steps": 2, "lr_schedule": "cosine"}, "ema_args": {"decay": 0.9},
                  "grids": {"every": 0}, **model},
        "data": {"class_path": "gspn_gen.data.datamodule.DigitsDataModule",
                 "init_args": {"image_size": 8, "batch_size": 8}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def fit(config: Path, *extra: str) -> None:
    train_cli.main(["fit", "--config", str(config), *extra])


def test_fit_writes_self_describing_checkpoint_and_logs(tmp_path):
    fit(write_config(tmp_path, max_steps=3))
    ckpt = read_checkpoint(str(tmp_path / "last.ckpt"))  # weights_only=True inside
    hp = ckpt["hyper_parameters"]
    assert ckpt["global_step"] == 3
    assert (hp["num_classes"], hp["in_channels"], hp["input_size"]) == (10, 1, 8)  # linked from the data
    assert hp["codec"] == {"name": "identity"} and hp["class_names"][3] == "3"
    assert any(k.startswith("ema.") for k in ckpt["state_dict"])
    metrics = (tmp_path / "metrics.csv").read_text()
    for name in ("train/loss", "train/grad_norm", "train/lr", "train/images_per_sec"):
        assert name in metrics
    assert list(tmp_path.glob("events.out.tfevents.*")), "no TensorBoard log"


def test_resume_restores_model_ema_optimizer_and_step(tmp_path):
    straight, resumed = tmp_path / "a", tmp_path / "b"
    straight.mkdir(), resumed.mkdir()
    fit(write_config(straight, max_steps=4))
    fit(write_config(resumed, max_steps=2))
    fit(write_config(resumed, max_steps=4), "--ckpt_path", str(resumed / "last.ckpt"))
    a, b = (read_checkpoint(str(d / "last.ckpt")) for d in (straight, resumed))
    assert a["global_step"] == b["global_step"] == 4
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, msg=f"{key} differs after resume")
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    torch.testing.assert_close(sb[0]["exp_avg"], sa[0]["exp_avg"])
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"] == 4


def test_nan_loss_stops_with_step_and_keeps_last_checkpoint(tmp_path, monkeypatch, capsys):
    from gspn_gen.lit import GenerationModule

    config = write_config(tmp_path, max_steps=5)
    original = GenerationModule.training_step

    def poisoned(self, batch, batch_idx):
        loss = original(self, batch, batch_idx) if self.global_step < 2 else None
        if loss is None:
            x, y = batch
            return original(self, (x * float("nan"), y), batch_idx)
        return loss

    monkeypatch.setattr(GenerationModule, "training_step", poisoned)
    with pytest.raises(SystemExit) as exc:
        fit(config)
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "loss is nan at global step 2" in err
    assert read_checkpoint(str(tmp_path / "last.ckpt"))["global_step"] == 2


@pytest.mark.parametrize("override, expected", [
    (["--model.model", "GSPN-Q/7"], "GSPN-Q/7"),
    (["--model.no_such_key", "1"], "no_such_key"),
    (["--data.init_args.image_size", "13"], "image_size"),
])
def test_bad_config_gives_one_clear_error(tmp_path, capsys, override, expected):
    with pytest.raises(SystemExit) as exc:
        fit(write_config(tmp_path, max_steps=1), *override)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and "usage:" not in err  # one error line, not the whole usage text
    assert err.strip().splitlines()[-1].startswith("error:")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("ckpt")
    fit(write_config(tmp, max_steps=2))
    return tmp / "last.ckpt"


def test_sample_grid_and_npz(checkpoint, tmp_path):
    from PIL import Image

    grid = tmp_path / "grid.png"
    sample_cli.main(["--ckpt", str(checkpoint), "--classes", "3", "7", "--per-class", "4", "--steps", "3",
                     "--out", str(grid)])
    w, h = Image.open(grid).size
    assert h >= 2 * 32 and w >= 4 * 32  # two rows of four (upscaled) 8x8 samples
    npz = tmp_path / "samples.npz"
    sample_cli.main(["--ckpt", str(checkpoint), "--num-samples", "25", "--steps", "3", "--batch-size", "10",
                     "--out", str(npz)])
    data = np.load(npz)
    assert data["arr_0"].shape == (25, 8, 8, 3) and data["arr_0"].dtype == np.uint8
    assert data["arr_1"].dtype == np.int64 and np.bincount(data["arr_1"]).tolist() == [3] * 5 + [2] * 5
    assert not list(tmp_path.glob("*.tmp*")), "temp files left behind"


def test_samples_do_not_depend_on_batch_size(checkpoint, tmp_path):
    outs = []
    for bs in ("4", "7"):
        out = tmp_path / f"s{bs}.npz"
        sample_cli.main(["--ckpt", str(checkpoint), "--num-samples", "12", "--steps", "4", "--sampler", "ddpm",
                         "--batch-size", bs, "--out", str(out)])
        outs.append(np.load(out)["arr_0"])
    np.testing.assert_array_equal(outs[0], outs[1])


@pytest.mark.parametrize("args, expected", [
    (["--ckpt", "nope.ckpt", "--out", "g.png"], "does not exist"),
    (["--classes", "10", "--out", "g.png"], "out of range"),
    (["--out", "g.gif"], "expected a .png"),
    (["--out", "s.npz"], "--num-samples"),
])
def test_sample_errors_are_one_line(checkpoint, capsys, args, expected):
    if "--ckpt" not in args:
        args = ["--ckpt", str(checkpoint), *args]
    with pytest.raises(SystemExit) as exc:
        sample_cli.main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, check=False)


def test_help_texts_explain_options():
    train = run("train_gen.py", "fit", "--help")
    assert train.returncode == 0
    for opt in ("--model.model", "--model.ema_args.decay", "--model.optim.lr", "--model.grids.cfg_scale",
                "--trainer.devices", "--ckpt_path"):
        assert opt in train.stdout
    assert "preset name" in train.stdout  # option descriptions come from the docstrings
    sample = run("sample.py", "--help")
    assert sample.returncode == 0
    for opt in ("--ckpt", "--classes", "--per-class", "--num-samples", "--cfg-scale", "--steps",
                "--sampler", "--seed"):
        assert opt in sample.stdout


def test_two_rank_sampling_equals_one_process(checkpoint, tmp_path):
    args = ["--ckpt", str(checkpoint), "--num-samples", "14", "--steps", "3", "--sampler", "ddpm",
            "--shard-size", "4", "--batch-size", "3"]
    one, two = tmp_path / "one.npz", tmp_path / "two.npz"
    sample_cli.main([*args, "--out", str(one)])
    proc = run("sample.py", *args, "--devices", "2", "--accelerator", "cpu", "--out", str(two))
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = np.load(one), np.load(two)
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
    assert not (tmp_path / "two.npz.parts").exists()


def test_interrupted_sampling_resumes_where_it_stopped(checkpoint, tmp_path, monkeypatch):
    args = ["--ckpt", str(checkpoint), "--num-samples", "12", "--steps", "3", "--shard-size", "4"]
    full = tmp_path / "full.npz"
    sample_cli.main([*args, "--out", str(full)])

    out = tmp_path / "resumed.npz"
    calls = {"n": 0}
    real_save = sampling_run.save_npz

    def crash_after_two(images, labels, path, **extra):
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated crash")
        calls["n"] += 1
        real_save(images, labels, path, **extra)

    monkeypatch.setattr(sampling_run, "save_npz", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        sample_cli.main([*args, "--out", str(out)])
    assert len(list((tmp_path / "resumed.npz.parts").glob("shard-*.npz"))) == 2 and not out.exists()

    monkeypatch.setattr(sampling_run, "save_npz", real_save)
    drawn = []
    real_range = sampling_run.draw_range
    monkeypatch.setattr(sampling_run, "draw_range",
                        lambda m, req, lab, s, e, *a, **k: drawn.append((s, e)) or real_range(m, req, lab, s, e, *a, **k))
    sample_cli.main([*args, "--out", str(out)])
    assert drawn == [(8, 12)]  # only the missing shard
    np.testing.assert_array_equal(np.load(out)["arr_0"], np.load(full)["arr_0"])

    with pytest.raises(SystemExit):  # leftover shards drawn with other settings are refused
        (tmp_path / "other.npz.parts").mkdir()
        (tmp_path / "other.npz.parts" / "settings.json").write_text('{"seed": 5}')
        (tmp_path / "other.npz.parts" / "shard-00000.npz").write_bytes(b"")
        sample_cli.main([*args, "--out", str(tmp_path / "other.npz")])
