"""Nothing lost, nothing silently wrong: failed checkpoint writes, blown-up weights, resume checks, logs that
survive a resume, bad inputs in one line, sampling that refuses a replaced checkpoint and checks its shards."""

from __future__ import annotations

import errno
import hashlib
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from gspn_gen import checkpoints, sample_cli
from gspn_gen.checkpoints import read_checkpoint
from gspn_gen.checkpoints.build import load_module
from gspn_gen.lit import GenerationModule
from gspn_gen.sampling import run as sampling_run
from tests.test_train_sample import fit, write_config


def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def digest(root: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished 2-step run: config.yaml, metrics.csv, TensorBoard events and last.ckpt."""
    root = tmp_path_factory.mktemp("run")
    fit(write_config(root, max_steps=2))
    return root


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    real_save, calls = torch.save, []

    def enospc_on_third(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            buf = io.BytesIO()
            real_save(obj, buf)
            f.write(buf.getvalue()[:1000])  # half-written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoints.torch, "save", enospc_on_third)
    with pytest.raises(SystemExit) as exc:
        fit(write_config(tmp_path, max_steps=4))
    assert exc.value.code == 1
    errors = error_lines(capsys)
    assert len(errors) == 1 and "No space left" in errors[0] and "last.ckpt" in errors[0]
    assert read_checkpoint(str(tmp_path / "last.ckpt"))["global_step"] == 2
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_blown_up_weights_stop_before_a_checkpoint_is_written(tmp_path, monkeypatch, capsys):
    real_step = GenerationModule.optimizer_step

    def blow_up(self, *args, **kwargs):
        real_step(self, *args, **kwargs)
        if self.global_step >= 2:  # from the third optimizer step on
            with torch.no_grad():
                for p in self.model.parameters():
                    p.mul_(1e12)  # huge but finite: what lr 1e30 did before lr was bounded

    monkeypatch.setattr(GenerationModule, "optimizer_step", blow_up)
    with pytest.raises(SystemExit) as exc:
        fit(write_config(tmp_path, max_steps=4))
    assert exc.value.code == 1
    errors = error_lines(capsys)
    assert len(errors) == 1 and "weights" in errors[0] and "left as it was" in errors[0]
    ckpt = read_checkpoint(str(tmp_path / "last.ckpt"))
    assert ckpt["global_step"] == 2  # the step-3 checkpoint, the first with huge weights, was never written
    assert max(float(v.abs().max()) for v in ckpt["state_dict"].values() if v.is_floating_point()) < 1e3


def test_resume_appends_logs_and_applies_reported_changes(tmp_path, capsys):
    fit(write_config(tmp_path, max_steps=2))
    with open(tmp_path / "metrics.csv", "a") as f:
        f.write("0,7,0.5")  # a row torn by a kill
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())  # the run's config as Lightning saved it
    saved["trainer"]["max_steps"] = 4
    (tmp_path / "resume.yaml").write_text(yaml.safe_dump(saved))
    capsys.readouterr()
    fit(tmp_path / "resume.yaml", "--ckpt_path", str(tmp_path / "last.ckpt"), "--model.optim.lr", "5e-4")
    err = capsys.readouterr().err
    assert "info: resume with changed optim.lr: 0.001 -> 0.0005" in err
    assert "info: resume with changed trainer.max_steps: 2 -> 4" in err
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    steps = [int(line.split(",")[1]) for line in lines[1:]]
    assert steps == [0, 1, 2, 3], "history lost or torn row kept"
    group = read_checkpoint(str(tmp_path / "last.ckpt"))["optimizer_states"][0]["param_groups"][0]
    assert group["initial_lr"] == 5e-4


@pytest.mark.parametrize("override, key", [
    (["--model.model", "DiT-T/2"], "model:"),
    (["--model.model_args", "{hidden_size: 32, depth: 3, num_heads: 2}"], "model_args"),
    (["--data.init_args.image_size", "16"], "input_size"),
    (["--model.diffusion", "FlowMatching"], "diffusion:"),
    (["--model.diffusion.init_args.noise_schedule", "cosine"], "diffusion:"),
])
def test_resume_refuses_a_changed_run_without_touching_it(run_dir, capsys, override, key):
    config = write_config(run_dir, max_steps=4)
    before = digest(run_dir)
    with pytest.raises(SystemExit) as exc:
        fit(config, "--ckpt_path", str(run_dir / "last.ckpt"), *override)
    assert exc.value.code == 2
    errors = error_lines(capsys)
    assert len(errors) == 1 and key in errors[0]
    assert digest(run_dir) == before, "the run directory was touched before the resume was refused"


def test_resume_may_change_execution_settings_and_reports_them(tmp_path, capsys):
    """recompute, gspn_backend and compile change how a step runs, not what the model computes."""
    fit(write_config(tmp_path, max_steps=2))
    capsys.readouterr()
    fit(write_config(tmp_path, max_steps=3), "--ckpt_path", str(tmp_path / "last.ckpt"),
        "--model.model_args.recompute", "true", "--model.model_args.gspn_backend", "torch")
    err = capsys.readouterr().err
    assert "info: resume with changed model_args.recompute: None -> True" in err
    assert "info: resume with changed model_args.gspn_backend: None -> 'torch'" in err
    assert read_checkpoint(str(tmp_path / "last.ckpt"))["global_step"] == 3
    saved = read_checkpoint(str(tmp_path / "last.ckpt"))["hyper_parameters"]
    assert checkpoints.compare_hparams(saved, {**saved, "compile": True}) == ([], ["compile: False -> True"])


# Hyper-parameters as gspn-gen wrote them before the process and the model overrides were typed: the
# process by name with an untyped dict, model_args repeating the data shape (import-dit did that).
LEGACY_HPARAMS = {
    "model": "GSPN-T/2", "model_args": {"hidden_size": 32, "depth": 2, "num_heads": 2, "input_size": 8},
    "diffusion": "gaussian", "diffusion_args": {"learn_sigma": True, "timestep_respacing": None},
    "num_classes": 10, "in_channels": 1, "input_size": 8, "codec": {"name": "identity"},
    "class_names": [str(i) for i in range(10)], "lr": 0.001, "weight_decay": 0.0, "betas": [0.9, 0.999],
    "warmup_steps": 2, "lr_schedule": "cosine", "min_lr_ratio": 0.0, "ema_decay": 0.9, "ema_warmup": True,
    "sample_every": 0, "sample_cfg_scale": 4.0, "sample_steps": 50, "sample_per_class": 4,
    "sample_max_classes": 10, "fused_adamw": None, "compile": False,
    "_instantiator": "lightning.pytorch.cli.instantiate_module",
}


def test_a_checkpoint_in_the_old_format_samples_loads_and_resumes(run_dir, tmp_path, capsys):
    ckpt = read_checkpoint(str(run_dir / "last.ckpt"))
    ckpt["hyper_parameters"] = dict(LEGACY_HPARAMS)
    torch.save(ckpt, tmp_path / "last.ckpt")
    module = load_module(str(tmp_path / "last.ckpt"))
    assert type(module.diffusion).__name__ == "GaussianDiffusion" and module.diffusion.learn_sigma
    assert all(torch.equal(v, ckpt["state_dict"][k]) for k, v in module.state_dict().items())
    sample("--ckpt", str(tmp_path / "last.ckpt"), "--classes", "1", "--per-class", "2", "--steps", "2",
           "--out", str(tmp_path / "g.png"))
    assert (tmp_path / "g.png").is_file()
    capsys.readouterr()
    fit(write_config(tmp_path, max_steps=3), "--ckpt_path", str(tmp_path / "last.ckpt"))
    assert not error_lines(capsys) and read_checkpoint(str(tmp_path / "last.ckpt"))["global_step"] == 3
    assert not list(tmp_path.glob("last-v*.ckpt"))  # replaced in place, also from another run's dirpath
    for bad, reason in (({"model_args": {"input_size": 16}}, "contradicts input_size"),
                        ({"diffusion_args": {"timestep_respacing": "25"}}, "timestep_respacing")):
        with pytest.raises(ValueError, match=reason):
            checkpoints.upgrade_hparams({**LEGACY_HPARAMS, **bad})
    # the same unreadable settings given to a resume: one error line, exit 2, no traceback
    ckpt["hyper_parameters"] = {**LEGACY_HPARAMS, "diffusion_args": {"timestep_respacing": "25"}}
    torch.save(ckpt, tmp_path / "respaced.ckpt")
    with pytest.raises(SystemExit) as exc:
        fit(write_config(tmp_path, max_steps=4), "--ckpt_path", str(tmp_path / "respaced.ckpt"))
    assert exc.value.code == 2 and any("timestep_respacing" in line for line in error_lines(capsys))


@pytest.mark.parametrize("content, expected", [
    (b"", "is empty"),
    (b"not a checkpoint\n", "not a torch checkpoint"),
    (None, "truncated"),
    ("missing", "does not exist"),
])
def test_unreadable_resume_names_the_newest_readable_checkpoint(run_dir, tmp_path, capsys, content, expected):
    bad = tmp_path / "bad.ckpt"
    if content is None:
        bad.write_bytes((run_dir / "last.ckpt").read_bytes()[:3000])
    elif content != "missing":
        bad.write_bytes(content)
    shutil.copy(run_dir / "last.ckpt", tmp_path / "good.ckpt")
    with pytest.raises(SystemExit) as exc:
        (tmp_path / "new").mkdir()
        fit(write_config(tmp_path / "new", max_steps=4), "--ckpt_path", str(bad))
    assert exc.value.code == 2
    errors = error_lines(capsys)
    assert len(errors) == 1 and expected in errors[0] and str(tmp_path / "good.ckpt") in errors[0]


@pytest.mark.parametrize("override, expected", [
    (["--model.optim.lr", "abc"], "--model.optim.lr: expected a float, got 'abc'"),
    (["--model.diffusion", "foo"],
     "--model.diffusion: expected a class name or import path (GaussianDiffusion, FlowMatching), got 'foo'"),
    (["--model.diffusion.learn_sigm", "true"], "--model.diffusion.init_args.learn_sigm: Option 'learn_sigm' is not"),
    (["--model.diffusion.init_args.sampler", "ddpx"],
     "--model.diffusion.init_args.sampler: expected one of 'ddim', 'ddpm', got 'ddpx'"),
    (["--model.model_args.deptx", "3"], "unrecognized arguments: --model.model_args.deptx"),
    (["--model.model_args.depth", "x"], "--model.model_args.depth: expected an int, got 'x'"),
    (["--model.model_args.input_size", "4"], "unrecognized arguments: --model.model_args.input_size"),  # data's
    (["--data.init_args.batch_size", "2.5"], "--data.init_args.batch_size: expected an int, got '2.5'"),
    (["--model.optim.warmup_steps", "-5"], "optim.warmup_steps must be >= 0"),
    (["--model.optim.min_lr_ratio", "5"], "optim.min_lr_ratio must be in [0, 1]"),
    (["--model.optim.lr", "1e30"], "optim.lr must be in (0, 1]"),
    (["--model.grids.cfg_scale", "-1"], "grids.cfg_scale must be between 0 and 100"),
    (["--ckpt_path", "last", "--weights_only", "false"], "never unpickled"),
    (["--data", "gspn_gen.data.datamodule.FashionMNISTDataModule", "--data.init_args.root", "/nonexistent"],
     "Fashion-MNIST root '/nonexistent'"),
    (["--data", "gspn_gen.data.datamodule.TorchvisionDataModule", "--data.init_args.name", "MNIST",
      "--data.init_args.root", "/nonexistent"], "data root '/nonexistent' is not a directory"),
])
def test_bad_training_values_are_one_line(tmp_path, capsys, override, expected):
    with pytest.raises(SystemExit) as exc:
        fit(write_config(tmp_path, max_steps=1), *override)
    assert exc.value.code == 2
    errors = error_lines(capsys)
    assert len(errors) == 1 and expected in errors[0]


def test_unwritable_root_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as exc:
        fit(write_config(tmp_path, max_steps=1), "--trainer.default_root_dir", str(tmp_path / "file" / "run"))
    assert exc.value.code == 2
    assert "default_root_dir" in error_lines(capsys)[0]


# ---------------------------------------------------------------- sampling
def sample(*args: str) -> None:
    sample_cli.main(list(args))


def crafted(run_dir: Path, tmp_path: Path, **hparams) -> str:
    ckpt = read_checkpoint(str(run_dir / "last.ckpt"))
    ckpt["hyper_parameters"].update(hparams)
    path = tmp_path / "crafted.ckpt"
    torch.save(ckpt, path)
    return str(path)


def test_grid_format_follows_the_extension_in_any_case(run_dir, tmp_path):
    ckpt = str(run_dir / "last.ckpt")
    sample("--ckpt", ckpt, "--classes", "1", "--per-class", "2", "--steps", "2", "--out", str(tmp_path / "g.jpg"))
    assert (tmp_path / "g.jpg").read_bytes()[:3] == b"\xff\xd8\xff"  # JPEG, not PNG bytes
    sample("--ckpt", ckpt, "--classes", "1", "--per-class", "2", "--steps", "2", "--out", str(tmp_path / "G.PNG"))
    assert (tmp_path / "G.PNG").read_bytes()[:4] == b"\x89PNG"
    sample("--ckpt", ckpt, "--num-samples", "3", "--steps", "2", "--out", str(tmp_path / "A.NPZ"))
    assert np.load(tmp_path / "A.NPZ")["arr_0"].shape[0] == 3


@pytest.mark.parametrize("args, expected", [
    (["--device", "tpu"], "--device 'tpu': expected cpu, cuda"),
    (["--cfg-scale", "1e30"], "--cfg-scale must be between 0 and 100"),
    (["--cfg-scale", "-5"], "--cfg-scale must be between 0 and 100"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--sampler", "heun"], "--sampler 'heun'"),
    ({"model": "GSPN-Q/9"}, "unknown model preset 'GSPN-Q/9'"),
    ({"num_classes": -3}, "holds a config that cannot be built"),
])
def test_bad_sampling_inputs_are_one_line(run_dir, tmp_path, capsys, args, expected):
    ckpt = crafted(run_dir, tmp_path, **args) if isinstance(args, dict) else str(run_dir / "last.ckpt")
    with pytest.raises(SystemExit) as exc:
        sample("--ckpt", ckpt, "--out", str(tmp_path / "g.png"), *([] if isinstance(args, dict) else args))
    assert exc.value.code == 2
    errors = error_lines(capsys)
    assert len(errors) == 1 and expected in errors[0]


def test_nan_weights_warn_when_sampling(run_dir, tmp_path, capsys):
    ckpt = read_checkpoint(str(run_dir / "last.ckpt"))
    for v in ckpt["state_dict"].values():
        if v.is_floating_point():
            v.fill_(float("nan"))
    torch.save(ckpt, tmp_path / "nan.ckpt")
    sample("--ckpt", str(tmp_path / "nan.ckpt"), "--classes", "1", "--per-class", "2", "--steps", "2",
           "--out", str(tmp_path / "g.png"))
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert any("NaN/inf in" in w and "weight tensors" in w for w in warnings)
    assert any("2 of 2 samples hold NaN/inf" in w for w in warnings)


def test_sampling_resume_refuses_a_replaced_checkpoint_and_redraws_bad_shards(run_dir, tmp_path, monkeypatch,
                                                                              capsys):
    ckpt, out = tmp_path / "model.ckpt", tmp_path / "s.npz"
    shutil.copy(run_dir / "last.ckpt", ckpt)
    args = ["--ckpt", str(ckpt), "--num-samples", "8", "--shard-size", "4", "--steps", "2", "--out", str(out)]
    sample(*args, "--out", str(tmp_path / "full.npz"))
    full = np.load(tmp_path / "full.npz")["arr_0"]

    real_assemble = sampling_run.assemble
    monkeypatch.setattr(sampling_run, "assemble", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt("killed")))
    with pytest.raises(KeyboardInterrupt):  # every shard drawn, killed before assembly
        sample(*args)
    monkeypatch.setattr(sampling_run, "assemble", real_assemble)
    parts = tmp_path / "s.npz.parts"

    replaced = read_checkpoint(str(ckpt))
    replaced["state_dict"]["ema.final_layer.linear.bias"] += 1
    torch.save(replaced, ckpt)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        sample(*args)
    assert exc.value.code == 2 and "another checkpoint" in error_lines(capsys)[0] and not out.exists()

    shutil.copy(run_dir / "last.ckpt", ckpt)
    with np.load(parts / "shard-00001.npz") as z:  # a short shard: 2 of its 4 images
        np.savez(parts / "shard-00001.npz", arr_0=z["arr_0"][:2], arr_1=z["arr_1"][:2], settings=z["settings"])
    sample(*args)
    assert "shard-00001.npz holds images of shape (2," in capsys.readouterr().err
    np.testing.assert_array_equal(np.load(out)["arr_0"], full)
    assert not parts.exists()

    parts.mkdir()  # a manifest left by a run that failed before drawing anything does not block
    (parts / "settings.json").write_text('{"seed": 5}')
    out.unlink()
    sample(*args)
    np.testing.assert_array_equal(np.load(out)["arr_0"], full)


def test_no_file_input_is_ever_unpickled(run_dir, tmp_path, monkeypatch):
    from benchmarks import fault_drill
    from fid_eval.__main__ import main as fid_main
    from gspn_gen import train_cli

    marker = tmp_path / "PICKLE_RAN"
    evil = fault_drill.write_malicious_files(tmp_path / "evil", marker)
    (tmp_path / "run").mkdir()
    config = write_config(tmp_path / "run", max_steps=4)
    shutil.copy(evil["checkpoint"], tmp_path / "run" / "last.ckpt")  # what `--ckpt_path last` finds
    for argv in (["--ckpt_path", str(evil["checkpoint"])], ["--ckpt_path", str(evil["checkpoint"]),
                 "--weights_only", "false"], ["--ckpt_path", "last"], ["--ckpt_path", "last", "--weights_only", "0"]):
        with pytest.raises(SystemExit) as exc:
            train_cli.main(["fit", "--config", str(config), *argv])
        assert exc.value.code == 2 and not marker.exists(), argv
    with pytest.raises(SystemExit):
        sample("--ckpt", str(evil["checkpoint"]), "--out", str(tmp_path / "g.png"))
    out = tmp_path / "s.npz"
    (tmp_path / "s.npz.parts").mkdir()
    shutil.copy(evil["shard"], tmp_path / "s.npz.parts" / "shard-00000.npz")  # redrawn, never unpickled
    sample("--ckpt", str(run_dir / "last.ckpt"), "--num-samples", "2", "--steps", "1", "--out", str(out))
    monkeypatch.setenv("GSPN_FID_CACHE", str(tmp_path / "cache"))
    fid = ["--extractor", "digits", "--device", "cpu", "--no-progress"]
    for argv in (["--samples", str(evil["npz_object_array"]), "--ref", str(out)],
                 ["--samples", str(out), "--ref", str(evil["stats_pt"])],
                 ["--samples", str(out), "--ref", str(evil["stats_npz"])],
                 ["--samples", str(out), "--ref", str(out), "--weights", str(evil["extractor_weights"])]):
        assert fid_main([*argv, *fid]) == 2, argv
    assert not marker.exists()
