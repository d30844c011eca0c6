"""The LightningModule: backbone + diffusion process + EMA + optimiser/schedule + logging.

The constructor's typed arguments are the `model:` section of a LightningCLI config, and
`save_hyperparameters()` stores them in every checkpoint as plain containers (the process as
{class_path, init_args}, every model_args field), so `sample.py` rebuilds the exact model, diffusion
and codec from the checkpoint alone (gspn_gen.checkpoints.build). The data-dependent arguments
(`num_classes`, `in_channels`, `input_size`, `codec`, `class_names`) are linked from the datamodule
by the CLI; they, and the process's learn_sigma, are the only source of the backbone's input shape,
classes and output channels. The optimiser, EMA and grid settings come in groups (`Optim`, `EMAArgs`,
`SampleGrids`: `model.optim.lr` in a config); a checkpoint stores each as a dict.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
import warnings
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import grad_norm, rank_zero_only, rank_zero_warn

from gspn_gen.data.sampler import derive_seed, run_seed
from gspn_gen.diffusion import FlowMatching, GaussianDiffusion, describe
from gspn_gen.distill import Distillation, Distiller
from gspn_gen.lightning_compat import attached_trainer, keep_initial_hparams, set_last_lr, total_batch_index
from gspn_gen.models.zoo import NO_OVERRIDES, ModelArgs, build_model, model_overrides
from gspn_gen.sampling.draw import class_grid, generate, has_null_class, save_image
from gspn_gen.sampling.request import check_cfg_scale

# The EMA copy is deliberately kept in eval mode; Lightning would warn about it at every fit start.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")


class NonFiniteLossError(RuntimeError):
    """Raised when the training loss becomes NaN or infinite; training stops, the last checkpoint stays."""


class NonFiniteWeightsError(NonFiniteLossError):
    """Raised instead of writing a checkpoint whose weights are NaN, inf or blown up."""


# No trained network has weights near this; a diverging one passes it steps before they overflow to inf.
WEIGHT_LIMIT = 1e10


@dataclasses.dataclass(frozen=True)
class Optim:
    """AdamW and its learning-rate schedule.

    Args:
        lr: peak AdamW learning rate, in (0, 1].
        weight_decay: AdamW weight decay (>= 0).
        betas: AdamW betas, each in [0, 1).
        warmup_steps: linear LR warmup steps (>= 0).
        lr_schedule: constant after warmup, or cosine decay to lr * min_lr_ratio at the last step.
        min_lr_ratio: final LR fraction of the cosine schedule, in [0, 1].
        fused_adamw: use the fused AdamW kernel (default: on CUDA only).
    """

    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.0
    fused_adamw: bool | None = None

    def __post_init__(self):
        if not 0 < self.lr <= 1:  # AdamW moves every weight by about lr per step
            raise ValueError(f"optim.lr must be in (0, 1], got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1] (a fraction of lr), got {self.min_lr_ratio}")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {list(self.betas)}")


@dataclasses.dataclass(frozen=True)
class EMAArgs:
    """The exponential moving average of the weights that sampling uses.

    Args:
        decay: decay per optimizer step, in [0, 1).
        warmup: use min(decay, (1 + step) / (10 + step)) so early EMA weights are not stale.
    """

    decay: float = 0.9999
    warmup: bool = True

    def __post_init__(self):
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"ema_args.decay must be in [0, 1), got {self.decay}")


@dataclasses.dataclass(frozen=True)
class SampleGrids:
    """Class grids drawn from the EMA model during training (<log_dir>/samples/step-XXXXXXX.png, TensorBoard).

    Args:
        every: write a grid every this many steps (0 disables).
        cfg_scale: guidance scale of the grids (a model without a null class is sampled unguided).
        steps: sampling steps of the grids.
        per_class: images per class.
        max_classes: at most this many classes (the first ones).
    """

    every: int = 0
    cfg_scale: float = 4.0
    steps: int = 50
    per_class: int = 4
    max_classes: int = 10

    def __post_init__(self):
        check_cfg_scale(self.cfg_scale, "grids.cfg_scale")
        for name in ("steps", "per_class", "max_classes"):
            if getattr(self, name) < 1:
                raise ValueError(f"grids.{name} must be >= 1, got {getattr(self, name)}")
        if self.every < 0:
            raise ValueError(f"grids.every must be >= 0 (0: no grids), got {self.every}")


def as_group(cls, value):
    """A settings group as given (dataclass) or as a checkpoint stores it (dict)."""
    return value if isinstance(value, cls) else cls(**dict(value))


class GenerationModule(L.LightningModule):
    """Class-conditional diffusion / flow training of a DiT-style backbone (GSPN or attention mixer)."""

    def __init__(
        self,
        model: str = "GSPN-T/4",
        model_args: ModelArgs = NO_OVERRIDES,
        diffusion: GaussianDiffusion | FlowMatching | None = None,
        num_classes: int = 10,
        in_channels: int = 1,
        input_size: int = 16,
        codec: dict | None = None,
        class_names: list[str] | None = None,
        optim: Optim = Optim(),
        ema_args: EMAArgs = EMAArgs(),
        grids: SampleGrids = SampleGrids(),
        compile: bool = False,
        distill: Distillation | None = None,
    ):
        """Build backbone, diffusion process and EMA copy.

        Args:
            model: preset name from the registry (`python -m gspn_gen.models.zoo` lists them), e.g. GSPN-XL/2.
            model_args: overrides of the preset's backbone arguments (hidden_size, depth, chunk, ...);
                null fields keep the preset's value.
            diffusion: the process, training objective and samplers: GaussianDiffusion (ADM/DiT DDPM,
                the default) or FlowMatching (SiT), e.g. {class_path: FlowMatching, init_args:
                {sampler: sde}}; its learn_sigma decides the backbone's output channels.
            num_classes: number of classes (linked from the datamodule); id num_classes is the null class.
            in_channels: channels of the model-space input (linked from the datamodule).
            input_size: spatial size of the model-space input, latent or pixels (linked from the datamodule).
            codec: how samples are decoded to images (linked from the datamodule's codec).
            class_names: class names for sample grids (linked from the datamodule).
            optim: AdamW and its learning-rate schedule (Optim).
            ema_args: the EMA weights used for sampling (EMAArgs).
            grids: class grids drawn during training (SampleGrids).
            compile: torch.compile the training model's blocks (in place: parameter names, checkpoints
                and the EMA model used for sampling stay as they are); the first steps take longer.
            distill: distil the model from a frozen attention teacher (gspn_gen.distill), handed over with
                `attach_teacher`; null: ordinary training.
        """
        super().__init__()
        self.save_hyperparameters()
        self.optim, self.ema_args, self.grids = as_group(Optim, optim), as_group(EMAArgs, ema_args), \
            as_group(SampleGrids, grids)
        self.distill = None if distill is None else as_group(Distillation, distill)
        self.diffusion = GaussianDiffusion() if diffusion is None else diffusion
        overrides = model_overrides(model_args)
        if self.distill is not None and overrides.get("fixed_pos_embed") is None:
            overrides["fixed_pos_embed"] = True  # the student keeps the teacher's position embedding
        self.model = build_model(model, input_size=input_size, in_channels=in_channels, num_classes=num_classes,
                                 learn_sigma=self.diffusion.learn_sigma, **overrides)
        # Checkpoints hold plain containers only (they are read with weights_only=True).
        self.hparams.update(
            model_args={f.name: overrides.get(f.name) for f in dataclasses.fields(ModelArgs)},
            diffusion=describe(self.diffusion),
            optim=dataclasses.asdict(self.optim), ema_args=dataclasses.asdict(self.ema_args),
            grids=dataclasses.asdict(self.grids),
            distill=None if self.distill is None else dataclasses.asdict(self.distill))
        keep_initial_hparams(self)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.distiller: Distiller | None = None  # attach_teacher
        if compile:
            self.model.compile_blocks()
        self._last_step_time: float | None = None
        self._last_grid_step = -1
        self._resumed = False  # set when Lightning restores a checkpoint into this module
        self._run_seed: int | None = None  # seed of the training steps' random streams (on_train_batch_start)

    def attach_teacher(self, teacher: L.LightningModule) -> None:
        """Distil from `teacher`, a loaded GenerationModule (gspn_gen.checkpoints.build.hand_teacher loads it): checked
        against this model, which (and its EMA) starts from the teacher's weights (gspn_gen.distill)."""
        if self.distill is None:
            raise ValueError("attach_teacher: this module was built without distill settings")
        self.distiller = Distiller(self.distill, teacher, self)

    @property
    def null_class(self) -> int:
        return self.hparams.num_classes

    # ---------------------------------------------------------------- training
    def training_step(self, batch, batch_idx):
        losses = self.training_losses(batch)
        loss = losses["loss"].mean()
        finite = self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True)
        if not finite:  # every rank stops together, so none waits in an all-reduce
            raise NonFiniteLossError(
                f"loss is {loss.item()} at global step {self.global_step} (on this or another rank): "
                "training stopped; "
                "the last good checkpoint is left as it was (lower the lr or enable gradient clipping)"
            )
        self.log("train/loss", loss, prog_bar=True)
        for name, value in losses.items():
            if name != "loss":
                self.log(f"train/{name}", value.mean())
        return loss

    def training_losses(self, batch) -> dict[str, torch.Tensor]:
        """Per-sample loss terms (N,) of a batch; "loss" is minimised, the others are logged.
        The diffusion loss, or the distillation loss (gspn_gen.distill) when distilling."""
        if self.distill is not None:
            if self.distiller is None:
                raise RuntimeError("this module distils (distill settings) but has no teacher: hand it one with "
                                   "attach_teacher (train_gen.py does)")
            return self.distiller.training_losses(self, batch)
        x, y = batch  # (B, C, H, W), (B,)
        return self.diffusion.training_losses(self.model, x, y)

    def on_before_optimizer_step(self, optimizer) -> None:
        norms = grad_norm(self.model, norm_type=2)
        self.log("train/grad_norm", norms["grad_2.0_norm_total"], prog_bar=True)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self._update_ema()  # here, not in on_train_batch_end: checkpoint callbacks run before that hook

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last_step_time is not None:
            images = batch[0].shape[0] * self.trainer.world_size
            self.log("train/images_per_sec", images / max(now - self._last_step_time, 1e-9), prog_bar=True)
        self._last_step_time = now
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        every = self.grids.every
        if every and self.global_step % every == 0 and self.global_step != self._last_grid_step:
            self._last_grid_step = self.global_step  # once per step, also with gradient accumulation
            if isinstance(self.trainer.strategy, FSDPStrategy):
                # The sharded EMA cannot run on rank 0 alone; sample from a checkpoint with sample.py.
                rank_zero_warn("grids.every is ignored under FSDP", category=UserWarning)
            else:
                self.log_sample_grid()

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = self.ema_args.decay
        if self.ema_args.warmup:
            step = self.global_step
            decay = min(decay, (1 + step) / (10 + step))
        ema = list(self.ema.parameters())
        src = list(self.model.parameters())
        torch._foreach_lerp_(ema, src, 1.0 - decay)
        for b_ema, b in zip(self.ema.buffers(), self.model.buffers()):
            b_ema.copy_(b)

    # The random stream of a training step (noise, timesteps, label dropout) is seeded from (run seed,
    # rank, batch index), so a resumed run draws what the unbroken run drew at the same step, on every
    # rank, whatever ran in between (data loading, sample grids, FID). The run seed travels in checkpoints.
    def on_train_batch_start(self, batch, batch_idx) -> None:
        torch.manual_seed(derive_seed(self._run_seed, self.trainer.global_rank, total_batch_index(self.trainer)))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self._check_weights()
        if self.distiller is not None:
            self.distiller.save(checkpoint)
        checkpoint["train_seed"] = self._run_seed

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.distiller is not None:
            self.distiller.check(checkpoint)
        if attached_trainer(self) is None:  # plain load_from_checkpoint: not a resume
            return
        if self.distill is not None and self.distiller is None:
            raise RuntimeError("resuming a distillation needs its teacher: hand it over with attach_teacher")
        self._resumed = True
        if checkpoint.get("train_seed") is not None:
            self._run_seed = int(checkpoint["train_seed"])

    def _check_weights(self) -> None:
        """Stop before a checkpoint with NaN/inf or blown-up weights (model or EMA) could replace a good one."""
        params = [p.detach() for p in (*self.model.parameters(), *self.ema.parameters()) if p.numel()]
        biggest = float(torch.stack([p.abs().amax().float() for p in params]).max()) if params else 0.0
        sane = math.isfinite(biggest) and biggest <= WEIGHT_LIMIT
        if attached_trainer(self) is not None:  # agree across ranks, so that no rank writes while another stops
            sane = self.trainer.strategy.reduce_boolean_decision(sane, all=True)
        if not sane:
            raise NonFiniteWeightsError(
                f"weights reached {biggest:g} (not finite or beyond {WEIGHT_LIMIT:g}) at global step "
                f"{self.global_step} (on this or another rank): training stopped without writing a checkpoint; "
                "the last good checkpoint is left as it was (lower the lr or enable gradient clipping)"
            )

    def on_train_start(self) -> None:
        if self._resumed:
            self._use_current_optimizer_settings()

    def _use_current_optimizer_settings(self) -> None:
        """After a resume the optimizer and LR schedule follow this run's lr/betas/weight decay/schedule.

        Lightning restores them from the checkpoint; the resume check allows (and reports) changing them.
        Unchanged settings give back exactly the restored values.
        """
        hp = self.optim
        for config in self.trainer.lr_scheduler_configs:
            sched = config.scheduler
            if not hasattr(sched, "lr_lambdas"):
                continue
            sched.base_lrs = [hp.lr] * len(sched.optimizer.param_groups)
            for group, base, f in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
                group.update(initial_lr=base, lr=base * f(sched.last_epoch), betas=tuple(hp.betas),
                             weight_decay=hp.weight_decay)
            set_last_lr(sched, [group["lr"] for group in sched.optimizer.param_groups])

    def on_fit_start(self) -> None:
        if self._run_seed is None:  # not restored from a checkpoint
            self._run_seed = run_seed()

    def configure_optimizers(self):
        hp = self.optim
        fused = hp.fused_adamw if hp.fused_adamw is not None else self.device.type == "cuda"
        opt = torch.optim.AdamW(self.model.parameters(), lr=hp.lr, betas=tuple(hp.betas),
                                weight_decay=hp.weight_decay, fused=fused)
        total = self.trainer.estimated_stepping_batches if hp.lr_schedule == "cosine" else None
        if total is not None and not math.isfinite(total):
            raise ValueError("lr_schedule 'cosine' needs a finite trainer.max_steps or max_epochs")
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(hp.warmup_steps, total, hp.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---------------------------------------------------------------- sampling
    @rank_zero_only
    def log_sample_grid(self) -> None:
        """Write a class grid from the EMA model to <log_dir>/samples/step-XXXXXXX.png (and TensorBoard)."""
        hp = self.grids
        classes = list(range(min(self.hparams.num_classes, hp.max_classes)))
        labels = torch.tensor(classes).repeat_interleave(hp.per_class)
        cfg_scale = hp.cfg_scale if has_null_class(self) else 1.0  # no null class: unguided
        images = generate(self, labels, seed=0, cfg_scale=cfg_scale, steps=hp.steps)
        grid = class_grid(images, labels.tolist(), hp.per_class, self.hparams.class_names)
        log_dir = self.trainer.log_dir or self.trainer.default_root_dir
        save_image(grid, f"{log_dir}/samples/step-{self.global_step:07d}.png")
        for logger in self.loggers:
            if hasattr(logger.experiment, "add_image"):
                logger.experiment.add_image("samples/ema", torch.from_numpy(grid.copy()).permute(2, 0, 1),
                                            self.global_step)


def lr_lambda(warmup_steps: int, total_steps: int | None, min_ratio: float):
    """Linear warmup to 1, then constant (total_steps None) or cosine down to `min_ratio`."""

    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if total_steps is None:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f
