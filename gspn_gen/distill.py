"""Distil a DiT (attention) teacher into a GSPN student of the same width and depth (DESIGN.md §10).

An ordinary training run whose config has a `model.distill` section (`Distillation`):

    python train_gen.py fit --config configs/experiments/distill_dit-xl2_to_gspn-xl2_in256.yaml
    python train_gen.py fit --config ... --ckpt_path runs/x/checkpoints/last.ckpt        # resume

The student starts as the teacher with each attention replaced by a fresh GSPN mixer whose output
projection is zero (gspn_gen.convert.convert_to_gspn). Each step draws x_t from a data batch at a random
time, with labels replaced by the null class at the student's class-dropout rate, and matches the
student's whole output to the frozen teacher's on the same (x_t, t, y): epsilon and the sigma
interpolant for the Gaussian process, the velocity for flow matching. Optionally (`layer_weight`) each
block's mixer output is also matched to the teacher's attention on the same input (the student's own
mixer input), and after `distill_steps` steps training continues with the ordinary diffusion loss.

Everything else is ordinary training: EMA, optimiser, schedule, logging, sample grids, resume. The
teacher is loaded from its checkpoint path and is not saved in the student's checkpoints; each
checkpoint records the teacher's path and the SHA-256 of its weights, and a resume with a different
teacher is refused. `sample.py`, `fid_eval` and `load_module` read a distilled checkpoint without its
teacher (gspn_gen.checkpoints drops the `distill` settings when it only rebuilds the model).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from gspn_gen.diffusion import KINDS, FlowMatching, mean_flat

if TYPE_CHECKING:
    from gspn_gen.lit import GenerationModule


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

    def __init__(self, settings: Distillation, student: GenerationModule):
        """Load the teacher, check it fits, and start the student (model and EMA) from its weights."""
        from gspn_gen.checkpoints import codec_identity, load_module, read_checkpoint
        from gspn_gen.convert import convert_to_gspn

        self.settings = settings
        source = load_module(settings.teacher, accept=lambda ckpt: fits_as_teacher(ckpt["hyper_parameters"], student),
                             kind=f"teacher for {student.hparams.model}")
        check_compatible(source, student)
        if source.model.y_embedder.dropout_prob == 0 < student.model.y_embedder.dropout_prob:
            raise DistillationError(
                f"teacher {settings.teacher!r} was trained without label dropout (no null class), so it cannot "
                "teach the student's null class: set model.model_args.class_dropout_prob 0 for the student")
        # the codec from the file: `source.hparams` may be the student's while LightningCLI builds it
        theirs = codec_identity(read_checkpoint(settings.teacher, mmap=True)["hyper_parameters"].get("codec"))
        ours = codec_identity(student.hparams.get("codec"))
        if theirs != ours:
            raise DistillationError(f"the teacher's latents come from codec {theirs} but the student's data from "
                                    f"{ours}: distil on data encoded like the teacher's")
        net = source.ema if settings.teacher_ema else source.model
        # Not a submodule of the student: the teacher stays out of state_dict, checkpoints and the optimiser.
        self.teacher = net.requires_grad_(False).eval()
        self.teacher_sha256 = weights_sha256(net)
        try:
            convert_to_gspn(net, student.model)
        except ValueError as e:
            raise DistillationError(f"teacher {settings.teacher!r} cannot initialise {student.hparams.model}: "
                                    f"{e}") from None
        student.ema.load_state_dict(student.model.state_dict())

    def training_losses(self, student: GenerationModule, batch) -> dict[str, torch.Tensor]:
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
        x_t, t = noisy_input(student.diffusion, x0)
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


def check_compatible(teacher: GenerationModule, student: GenerationModule) -> None:
    """Teacher and student must model the same data with the same process; else DistillationError.

    Read from the built networks and processes, not from `hparams`: a module built while LightningCLI
    instantiates another one is given that one's hyper-parameters.
    """
    def facts(module: GenerationModule) -> dict:
        net, process = module.model, module.diffusion
        out = {"diffusion": next(name for name, kind in KINDS.items() if isinstance(process, kind)),
               "learn_sigma": process.learn_sigma, "num_classes": net.num_classes,
               "in_channels": net.in_channels, "input_size": net.grid[0] * net.patch_size}
        out.update({k: process.config[k] for k in ("num_timesteps", "noise_schedule") if k in process.config})
        return out

    theirs, ours = facts(teacher), facts(student)
    for name in ours:
        if theirs.get(name) != ours[name]:
            raise DistillationError(f"the teacher has {name}={theirs.get(name)!r} but the student {name}={ours[name]!r}")


def fits_as_teacher(hparams: dict, student: GenerationModule) -> bool:
    """Whether a checkpoint with these hyper-parameters could teach `student` (an attention model of its
    width and depth, for the same data and process); read from a shapes-only build of its model."""
    from gspn_gen.checkpoints import module_kwargs
    from gspn_gen.convert import shared_keys
    from gspn_gen.lit import GenerationModule
    from gspn_gen.models.mixer import GSPNMixer

    try:
        with torch.device("meta"):
            teacher = GenerationModule(**module_kwargs(hparams))
        check_compatible(teacher, student)
    except Exception:  # noqa: BLE001 - any checkpoint that cannot be built or does not fit is no teacher
        return False
    net, own = teacher.model, student.model
    if len(net.blocks) != len(own.blocks) or any(isinstance(b.mixer, GSPNMixer) for b in net.blocks):
        return False
    theirs, ours = net.state_dict(), own.state_dict()
    return all(theirs[k].shape == ours[k].shape for k in shared_keys(net, own))


def noisy_input(diffusion, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A training input x_t of the process at uniform random times, and the times the model sees."""
    n = x0.shape[0]
    noise = torch.randn_like(x0)
    if isinstance(diffusion, FlowMatching):
        t = torch.rand(n, device=x0.device)
        return diffusion.interpolate(x0, noise, t), t
    t = torch.randint(0, diffusion.num_timesteps, (n,), device=x0.device)
    return diffusion.q_sample(x0, t, noise), diffusion.model_timesteps(t)


def weights_sha256(net: nn.Module) -> str:
    """SHA-256 of a module's state dict (names and raw bytes, in order): the teacher's identity."""
    digest = hashlib.sha256()
    for name, tensor in net.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()
