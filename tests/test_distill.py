"""Distillation of a DiT teacher into a GSPN student (`model.distill` of an ordinary training run): the
loss goes down, resume is exact, checkpoints stay plain (no teacher inside, load_module takes them
without the teacher), and a different teacher or other settings are refused on resume."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from gspn_gen import distill, train_cli
from gspn_gen.checkpoints import compare_hparams, read_checkpoint, upgrade_hparams
from gspn_gen.checkpoints.build import hand_teacher, load_module
from gspn_gen.diffusion import FlowMatching, GaussianDiffusion
from gspn_gen.distill import Distillation
from gspn_gen.lit import GenerationModule
from tests.test_train_sample import write_config as tiny_config

TINY = {"hidden_size": 32, "depth": 2, "num_heads": 2}


def make_teacher(path: Path, seed: int = 0, diffusion: str = "gaussian") -> Path:
    """A DiT-T/2 checkpoint of ours (8x8 digits, 10 classes) with every weight random."""
    torch.manual_seed(seed)
    process = GaussianDiffusion() if diffusion == "gaussian" else FlowMatching()
    module = GenerationModule(model="DiT-T/2", model_args=TINY, diffusion=process, input_size=8)
    with torch.no_grad():
        for p in module.model.parameters():
            if p.requires_grad:
                p.normal_(std=0.1)
        module.ema.load_state_dict(module.model.state_dict())
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return make_teacher(tmp_path_factory.mktemp("teacher") / "dit.ckpt")


@pytest.mark.parametrize("diffusion, layer_weight", [("gaussian", 0.0), ("gaussian", 1.0), ("flow", 0.0)])
def test_a_distillation_step_lowers_the_loss_on_a_fixed_batch(tmp_path, diffusion, layer_weight):
    path = make_teacher(tmp_path / "t.ckpt", diffusion=diffusion)
    process = GaussianDiffusion() if diffusion == "gaussian" else FlowMatching()
    student = GenerationModule(model="GSPN-T/2", model_args=TINY, input_size=8, diffusion=process,
                               distill=Distillation(teacher=str(path), layer_weight=layer_weight))
    hand_teacher(student)
    batch = (torch.rand(8, 1, 8, 8) * 2 - 1, torch.arange(8) % 10)
    optimizer = torch.optim.SGD(student.model.parameters(), lr=0.05)

    def losses():
        torch.manual_seed(1)  # the same times, noise and dropped labels each time
        return student.training_losses(batch)

    before = losses()
    assert before["distill"].mean() > 0
    before["loss"].mean().backward()
    optimizer.step()
    with torch.no_grad():
        after = losses()
    assert after["loss"].mean() < before["loss"].mean()
    if layer_weight:
        assert after["layer"].mean() < before["layer"].mean()


def write_config(root: Path, teacher: Path, max_steps: int) -> Path:
    """The tiny training config of the other CLI tests, distilling from `teacher`."""
    root.mkdir(exist_ok=True)
    return tiny_config(root, max_steps, distill={"teacher": str(teacher), "layer_weight": 0.5, "distill_steps": 3})


def test_resume_is_exact_checkpoints_stay_plain_and_another_teacher_is_refused(teacher, tmp_path, capsys):
    straight, resumed = tmp_path / "a", tmp_path / "b"
    own = shutil.copy(teacher, tmp_path / "teacher.ckpt")
    train_cli.main(["fit", "--config", str(write_config(straight, own, 4))])
    train_cli.main(["fit", "--config", str(write_config(resumed, teacher, 2))])
    train_cli.main(["fit", "--config", str(write_config(resumed, teacher, 4)), "--ckpt_path",
                    str(resumed / "last.ckpt")])
    a, b = (read_checkpoint(str(d / "last.ckpt")) for d in (straight, resumed))
    assert a["global_step"] == b["global_step"] == 4  # steps 3 and 4 fine-tune with the diffusion loss
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        assert torch.equal(b["state_dict"][key], value), f"{key} differs after resume"
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)
    # No teacher inside: the student's weights, the settings, and the teacher's identity.
    assert not [k for k in a["state_dict"] if not k.startswith(("model.", "ema."))]
    assert a["hyper_parameters"]["distill"]["teacher"] == str(own) and len(a["distillation"]["teacher_sha256"]) == 64
    assert a["hyper_parameters"]["model_args"]["fixed_pos_embed"] is True
    logged = (straight / "metrics.csv").read_text().splitlines()[0]
    assert "train/distill" in logged and "train/layer" in logged and "train/mse" in logged
    Path(own).unlink()  # sampling and evaluation need nothing but the checkpoint
    assert type(load_module(str(straight / "last.ckpt")).ema.blocks[0].mixer).__name__ == "GSPNMixer"

    # A resume with another teacher is refused in one line.
    other = make_teacher(tmp_path / "other.ckpt", seed=1)
    with pytest.raises(SystemExit) as exc:
        train_cli.main(["fit", "--config", str(write_config(resumed, other, 5)), "--ckpt_path",
                        str(resumed / "last.ckpt")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and "not the one this run was distilled from" in err[-1]


def test_a_teacher_of_other_data_is_refused_in_one_line(tmp_path, capsys):
    path = make_teacher(tmp_path / "flow.ckpt", diffusion="flow")
    with pytest.raises(SystemExit) as exc:
        train_cli.main(["fit", "--config", str(write_config(tmp_path / "run", path, 1))])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and "diffusion='flow'" in err[-1]


def test_a_teacher_trained_on_other_latents_is_refused(tmp_path, teacher):
    ckpt = torch.load(teacher, weights_only=True)
    ckpt["hyper_parameters"]["codec"] = {"name": "sd-vae", "scale": 0.18215, "path": "/models/vae"}
    torch.save(ckpt, tmp_path / "latent_teacher.ckpt")
    with pytest.raises(distill.DistillationError, match="codec"):
        hand_teacher(GenerationModule(model="GSPN-T/2", model_args=TINY, input_size=8, diffusion=GaussianDiffusion(),
                                      distill=Distillation(teacher=str(tmp_path / "latent_teacher.ckpt"))))
    moved = {**ckpt["hyper_parameters"], "codec": {"name": "identity", "path": "/elsewhere"}}
    torch.save({**ckpt, "hyper_parameters": moved}, tmp_path / "moved.ckpt")  # where it is stored may differ
    hand_teacher(GenerationModule(model="GSPN-T/2", model_args=TINY, input_size=8, diffusion=GaussianDiffusion(),
                                  distill=Distillation(teacher=str(tmp_path / "moved.ckpt"))))


def test_resume_with_other_settings_is_refused_and_old_distillation_checkpoints_resume(teacher):
    student = GenerationModule(model="GSPN-T/2", model_args=TINY, input_size=8,
                               distill=Distillation(teacher=str(teacher), layer_weight=0.5))
    hand_teacher(student)
    saved = dict(student.hparams)
    refused, _ = compare_hparams({**saved, "distill": {**saved["distill"], "layer_weight": 0.0}}, saved)
    assert refused and refused[0].startswith("distill:")
    refused, _ = compare_hparams({**saved, "distill": {**saved["distill"], "teacher": "moved.ckpt"}}, saved)
    assert not refused  # the same teacher elsewhere: its weights are checked when the checkpoint loads
    # Written before distillation was a model option: settings beside the hyper-parameters.
    old = {k: v for k, v in saved.items() if k != "distill"}
    recorded = {"teacher": str(teacher), "teacher_sha256": "0" * 64, "teacher_ema": True, "output_weight": 1.0,
                "layer_weight": 0.5, "distill_steps": None}
    assert compare_hparams(upgrade_hparams(old, recorded), saved) == ([], [])
    with pytest.raises(distill.DistillationError, match="not the one"):
        student.on_load_checkpoint({"distillation": recorded})


def test_a_missing_teacher_hint_names_only_checkpoints_that_could_teach(tmp_path, capsys):
    """The newest file beside a missing teacher is a GSPN student (no teacher); only the DiT is offered."""
    make_teacher(tmp_path / "dit.ckpt")
    student = GenerationModule(model="GSPN-T/2", model_args=TINY, input_size=8, diffusion=GaussianDiffusion())
    torch.save({"state_dict": student.state_dict(), "hyper_parameters": dict(student.hparams)},
               tmp_path / "gspn.ckpt")  # written last: the newest readable checkpoint
    with pytest.raises(SystemExit) as exc:
        train_cli.main(["fit", "--config", str(write_config(tmp_path / "run", tmp_path / "gone.ckpt", 1))])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "gone.ckpt' does not exist" in err and str(tmp_path / "dit.ckpt") in err and "gspn.ckpt" not in err
    (tmp_path / "dit.ckpt").unlink()
    with pytest.raises(SystemExit):
        train_cli.main(["fit", "--config", str(write_config(tmp_path / "run2", tmp_path / "gone.ckpt", 1))])
    assert "no readable teacher for GSPN-T/2 in that directory" in capsys.readouterr().err


def test_a_teacher_without_a_null_class_cannot_teach_label_dropout(tmp_path):
    path = make_teacher(tmp_path / "dit.ckpt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["hyper_parameters"]["model_args"] = {**TINY, "class_dropout_prob": 0.0}
    torch.save(ckpt, path)
    with pytest.raises(distill.DistillationError, match="without label dropout"):
        hand_teacher(GenerationModule(model="GSPN-T/2", model_args=TINY, input_size=8, diffusion=GaussianDiffusion(),
                                      distill=Distillation(teacher=str(path))))
    hand_teacher(GenerationModule(model="GSPN-T/2", model_args={**TINY, "class_dropout_prob": 0.0}, input_size=8,
                                  diffusion=GaussianDiffusion(), distill=Distillation(teacher=str(path))))


def test_a_student_is_handed_its_teacher_and_does_not_train_without_one(teacher):
    student = GenerationModule(model="GSPN-T/2", model_args=TINY, input_size=8, distill=Distillation(teacher=str(teacher)))
    assert student.distiller is None  # building the student loads nothing
    batch = (torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))
    with pytest.raises(RuntimeError, match="has no teacher"):
        student.training_losses(batch)
    hand_teacher(student)
    assert torch.equal(student.model.x_embedder.proj.weight, load_module(str(teacher)).ema.x_embedder.proj.weight)
    assert set(student.training_losses(batch)) == {"loss", "distill"}
