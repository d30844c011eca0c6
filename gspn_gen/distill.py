"""Distil a DiT (attention) teacher into a GSPN student of the same width and depth (DESIGN.md §10).

An ordinary training run whose config has a `model.distill` section (`Distillation`):

    python train_gen.py fit --config configs/experiments/distill_dit-xl2_to_gspn-xl2_in256.yaml
    python train_gen.py fit --config ... --ckpt_path runs/x/checkpoints/last.ckpt        # resume

The teacher is handed to the student (`GenerationModule.attach_teacher`; the training command loads it
with gspn_gen.checkpoints.build.hand_teacher). The student then starts as the teacher with each attention
replaced by a fresh GSPN mixer whose output projection is zero (`convert_to_gspn`). Each step draws x_t
from a data batch at a random time (the process's `training_input`), with labels replaced by the null
class at the student's class-dropout rate, and matches the student's whole output to the frozen
teacher's on the same (x_t, t, y): epsilon and the sigma interpolant for the Gaussian process, the
velocity for flow matching. Optionally (`layer_weight`) each block's mixer output is also matched to
the teacher's attention on the same input (the student's own mixer input), and after `distill_steps`
steps training continues with the ordinary diffusion loss.

Everything else is ordinary training: EMA, optimiser, schedule, logging, sample grids, resume. The
teacher is not saved in the student's checkpoints; each checkpoint records the teacher's path and the
SHA-256 of its weights, and a resume with a different teacher is refused. `sample.py`, `fid_eval` and
`load_module` read a distilled checkpoint without its teacher.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from gspn_gen.codecs import codec_identity
from gspn_gen.diffusion import mean_flat
from gspn_gen.models.backbone import DiffusionBackbone
from gspn_gen.models.mixer import GSPNMixer

# Teacher and student are GenerationModules (gspn_gen.lit, which builds on this module): typed as nn.Module here.


class DistillationError(ValueError):
    """The teacher does not fit the student, or a resume would change the teacher."""


@dataclass(frozen=True)
class Distillation:
    """Distillation from a frozen attention teacher (gspn_gen.distill); null: ordinary training.

    Args:
        teacher: checkpoint of the teacher (a trained DiT, or an official one imported with
            `python -m gspn_gen.checkpoints import-dit`); needed again to resume. The student (the
            model section's preset) must have the teacher's width and depth; it keeps the teacher's
            fixed position embedding (model_args.fixed_pos_embed true unless set).
        teacher_ema: use the teacher's EMA weights (else its raw training weights).
        output_weight: weight of the output-matching loss (MSE over all output channels).
        layer_weight: weight of the layer-wise loss: each mixer's output against the teacher's
            attention on the same input, averaged over blocks (0: off).
        distill_steps: distil for this many steps, then fine-tune with the ordinary diffusion loss;
            null: distil throughout; 0: fine-tune the converted model without distillation.
    """

    teacher: str
    teacher_ema: bool = True
    output_weight: float = 1.0
    layer_weight: float = 0.0
    distill_steps: int | None = None

    def __post_init__(self):
        if self.output_weight < 0 or self.layer_weight < 0 or self.output_weight + self.layer_weight == 0:
            raise ValueError(f"distill.output_weight ({self.output_weight}) and distill.layer_weight "
                             f"({self.layer_weight}) must be >= 0, not both 0")
        if self.distill_steps is not None and self.distill_steps < 0:
            raise ValueError(f"distill.distill_steps must be >= 0 or null, got {self.distill_steps}")


class Distiller:
    """The frozen teacher of a GenerationModule and its distillation loss; built after the student."""

    def __init__(self, settings: Distillation, teacher: nn.Module, student: nn.Module):
        """Check that `teacher` (a loaded module) fits, and start the student (model and EMA) from its weights."""
        self.settings = settings
        check_compatible(teacher, student)
        if teacher.model.y_embedder.dropout_prob == 0 < student.model.y_embedder.dropout_prob:
            raise DistillationError(
                f"teacher {settings.teacher!r} was trained without label dropout (no null class), so it cannot "
                "teach the student's null class: set model.model_args.class_dropout_prob 0 for the student")
        theirs, ours = codec_identity(teacher.hparams.get("codec")), codec_identity(student.hparams.get("codec"))
        if theirs != ours:
            raise DistillationError(f"the teacher's latents come from codec {theirs} but the student's data from "
                                    f"{ours}: distil on data encoded like the teacher's")
        net = teacher.ema if settings.teacher_ema else teacher.model
        # Not a submodule of the student: the teacher stays out of state_dict, checkpoints and the optimiser.
        self.teacher = net.requires_grad_(False).eval()
        self.teacher_sha256 = weights_sha256(net)
        try:
            convert_to_gspn(net, student.model)
        except ValueError as e:
            raise DistillationError(f"teacher {settings.teacher!r} cannot initialise {student.hparams.model}: "
                                    f"{e}") from None
        student.ema.load_state_dict(student.model.state_dict())

    def training_losses(self, student: nn.Module, batch) -> dict[str, torch.Tensor]:
        """{"loss", "distill"[, "layer"]}, each (N,); the diffusion loss after `distill_steps`."""
        hp, model = self.settings, student.model
        if hp.distill_steps is not None and student.global_step >= hp.distill_steps:
            model.y_embedder.train(student.training)
            x, y = batch
            return student.diffusion.training_losses(model, x, y)
        x0, y = batch                                                         # (N, C, H, W), (N,)
        teacher = self.teacher.to(x0.device)
        y = model.y_embedder.drop(y)       # teacher and student see the same (possibly null) labels,
        model.y_embedder.eval()            # so the student must not drop labels again
        noisy = student.diffusion.training_input(x0)
        x_t, t = noisy.x_t, noisy.t_model
        records: list[tuple[torch.Tensor, tuple[int, int], torch.Tensor]] = []
        hooks = [block.mixer.register_forward_hook(lambda m, args, out: records.append((*args, out)))
                 for block in model.blocks] if hp.layer_weight else []
        try:
            out = model(x_t, t, y)                                            # (N, C_out, H, W)
        finally:
            for hook in hooks:
                hook.remove()
        with torch.no_grad():
            target = teacher(x_t, t, y)
        dtype = torch.promote_types(x0.dtype, torch.float32)
        terms = {"distill": mean_flat((out.to(dtype) - target.to(dtype)) ** 2)}
        terms["loss"] = hp.output_weight * terms["distill"]
        if hp.layer_weight:
            layer = torch.zeros_like(terms["distill"])
            for block, (h, grid, mixed) in zip(teacher.blocks, records):
                with torch.no_grad():
                    attended = block.mixer(h, grid)                           # (N, T, D)
                layer = layer + mean_flat((mixed.to(dtype) - attended.to(dtype)) ** 2)
            terms["layer"] = layer / len(records)
            terms["loss"] = terms["loss"] + hp.layer_weight * terms["layer"]
        return terms

    def save(self, checkpoint: dict) -> None:
        """Record the teacher's identity beside the student's weights."""
        checkpoint["distillation"] = {"teacher": self.settings.teacher, "teacher_sha256": self.teacher_sha256}

    def check(self, checkpoint: dict) -> None:
        """A resume must continue a distillation from this very teacher (same weights)."""
        recorded = checkpoint.get("distillation")
        if recorded is None:
            raise DistillationError("this checkpoint was not written by a distillation run; resume it without "
                                    "model.distill")
        if recorded["teacher_sha256"] != self.teacher_sha256:
            raise DistillationError(
                f"teacher {self.settings.teacher!r} is not the one this run was distilled from (weights SHA-256 "
                f"{self.teacher_sha256[:12]}..., the checkpoint records {recorded['teacher_sha256'][:12]}...)")


def check_compatible(teacher: nn.Module, student: nn.Module) -> None:
    """Teacher and student must model the same data with the same process; else DistillationError.

    Read from the built networks and processes, so a checkpoint of any version compares the same way.
    """
    def facts(module: nn.Module) -> dict:
        net, process = module.model, module.diffusion
        out = {"diffusion": process.name,
               "learn_sigma": process.learn_sigma, "num_classes": net.num_classes,
               "in_channels": net.in_channels, "input_size": net.grid[0] * net.patch_size}
        out.update({k: process.config[k] for k in ("num_timesteps", "noise_schedule") if k in process.config})
        return out

    theirs, ours = facts(teacher), facts(student)
    for name in ours:
        if theirs.get(name) != ours[name]:
            raise DistillationError(f"the teacher has {name}={theirs.get(name)!r} but the student {name}={ours[name]!r}")


def shared_keys(teacher: DiffusionBackbone, student: DiffusionBackbone) -> list[str]:
    """State-dict keys the two backbones share: everything but the mixers."""
    theirs = teacher.state_dict()
    return [k for k in student.state_dict() if k in theirs and ".mixer." not in k]


@torch.no_grad()
def convert_to_gspn(teacher: DiffusionBackbone, student: DiffusionBackbone) -> list[str]:
    """Start the GSPN `student` from the DiT `teacher`: copy every shared tensor bit for bit (the patch,
    time and class embedders, every adaLN modulation and MLP, the final layer, the fixed position
    embedding) and zero each mixer's output projection, so the student at step 0 is the DiT with its
    attention branches removed. Returns the copied keys; a shape or layout mismatch raises ValueError."""
    if len(teacher.blocks) != len(student.blocks):
        raise ValueError(f"the teacher has {len(teacher.blocks)} blocks, the student {len(student.blocks)}")
    if not all(isinstance(b.mixer, GSPNMixer) for b in student.blocks):
        raise ValueError("the student must be a GSPN model (mixer 'gspn')")
    if (teacher.pos_embed is None) != (student.pos_embed is None):
        raise ValueError("teacher and student must both have the fixed position embedding or both lack it "
                         "(build the student with fixed_pos_embed=True)")
    src, dst = teacher.state_dict(), student.state_dict()
    keys = shared_keys(teacher, student)
    for key in keys:
        if src[key].shape != dst[key].shape:
            raise ValueError(f"{key}: teacher shape {tuple(src[key].shape)}, student {tuple(dst[key].shape)}")
        dst[key].copy_(src[key])
    missing = [k for k in src if ".mixer." not in k and k not in dst]
    if missing:
        raise ValueError(f"the student has no {missing[0]!r} to take the teacher's weights")
    for block in student.blocks:
        torch.nn.init.zeros_(block.mixer.out_proj.weight)
        torch.nn.init.zeros_(block.mixer.out_proj.bias)
    return keys


def weights_sha256(net: nn.Module) -> str:
    """SHA-256 of a module's state dict (names and raw bytes, in order): the teacher's identity."""
    digest = hashlib.sha256()
    for name, tensor in net.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()
