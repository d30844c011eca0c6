"""A sampling request: what to draw, how, and where to write it; every value is validated here, once.

`sample.py`, the guidance sweep (gspn_gen.sweep), the FID callback and the benchmarks build a
`SampleRequest`; `gspn_gen.sampling.run.sample` runs it. What needs no model is checked when the
request is made (`SampleRequest.__post_init__`); what the model decides is checked when the request
meets it (`SampleRequest.check`): the sampler and step count of its process, guidance only with a
trained null class, the guided channels within its latent channels, the class ids within its classes.
Each check has one message, naming the value as the command line spells it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from gspn_gen.codecs import CodecLoadError, check_vae_source
from gspn_gen.diffusion import GaussianDiffusion
from gspn_gen.sampling.draw import IMAGE_FORMATS, has_null_class

MAX_CFG_SCALE = 100.0
# Flow matching integrates a continuous ODE/SDE; beyond this many steps a run only costs more (the
# Gaussian process is bounded by its own number of timesteps).
MAX_FLOW_STEPS = 1000
GRID_CLASSES = 16  # classes in a grid when none are named: the first ones
COUNTS = ("num_samples", "per_class", "batch_size", "shard_size", "devices", "num_nodes", "steps")


class SamplingError(ValueError):
    """A sampling request that cannot be run, said in one line (the command line prints it after `error:`)."""


def flag(name: str) -> str:
    """A request field as the command line spells it: num_samples -> --num-samples."""
    return "--" + name.replace("_", "-")


def check_cfg_scale(value: float, name: str = "--cfg-scale") -> None:
    """The guidance scale's range (the model's side is `SampleRequest.check`); SamplingError if outside."""
    if not (math.isfinite(value) and 0 <= value <= MAX_CFG_SCALE):
        raise SamplingError(f"{name} must be between 0 and {MAX_CFG_SCALE:g} (1: no guidance, 0: unconditional), "
                            f"got {value}")


def resolve_device(spec: str) -> torch.device:
    """--device as a torch.device that exists on this machine (auto: cuda when available)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise SamplingError(f"--device {spec!r}: expected cpu, cuda, cuda:N or auto")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SamplingError(f"--device {spec!r}: no CUDA GPU is available on this machine (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SamplingError(f"--device {spec!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


@dataclass(frozen=True)
class SampleRequest:
    """What to sample from which model, and where the images go.

    Sample i always uses the noise of (seed, i), so results do not depend on batch_size or devices.
    """

    ckpt: str | None = None                   # checkpoint to sample; None when `sample` is given a loaded module
    out: str | None = None                    # .png/.jpg/.jpeg: a class grid; .npz: a batch; None: returned
    classes: tuple[int, ...] | None = None    # grid rows (default: the first classes, at most GRID_CLASSES)
    per_class: int = 8                        # grid: images per class row
    num_samples: int | None = None            # a batch of this many, classes balanced (sample i: class i mod C)
    cfg_scale: float = 1.0                    # classifier-free guidance; 1: none, 0: unconditional
    guidance_interval: tuple[float, float] | None = None  # guide only where t / T lies in [lo, hi]
    guide_channels: int | None = None         # guide only the first k latent channels (DiT/SiT: 3); None: all
    sampler: str | None = None                # the process's own default when None
    steps: int | None = None                  # the process's own default when None
    seed: int = 0
    batch_size: int = 64                      # samples per forward pass
    device: str = "auto"                      # cpu, cuda, cuda:N or auto
    use_ema: bool = True                      # the EMA weights (else the raw training weights)
    vae: str | None = None                    # load the checkpoint's VAE from here instead
    overwrite: bool = False                   # replace an existing out (and shards of other settings)
    shard_size: int = 1000                    # .npz: samples per resumable shard in OUT.parts/
    devices: int = 1                          # .npz: processes on this node (Lightning Fabric, DDP)
    num_nodes: int = 1                        # .npz: nodes
    accelerator: str = "auto"                 # .npz with devices: cpu, gpu or auto

    def __post_init__(self):
        if self.out is not None:
            ext = Path(self.out).suffix.lower()
            if ext != ".npz" and ext not in IMAGE_FORMATS:
                raise SamplingError(f"--out {self.out!r}: expected a .png/.jpg/.jpeg (grid) or .npz (sample batch) "
                                    "path")
            if ext == ".npz" and not self.num_samples:
                raise SamplingError("--out *.npz needs --num-samples N")
        for name in COUNTS:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise SamplingError(f"{flag(name)} must be >= 1, got {value}")
        check_cfg_scale(self.cfg_scale)
        if self.guidance_interval is not None:
            lo, hi = self.guidance_interval
            if not 0 <= lo <= hi <= 1:
                raise SamplingError(f"--guidance-interval LO HI needs 0 <= LO <= HI <= 1, got {list(self.guidance_interval)}")
        if self.classes is not None and not self.classes:
            raise SamplingError("--classes: give at least one class id")
        resolve_device(self.device)
        if self.vae:
            try:
                check_vae_source(self.vae)
            except CodecLoadError as e:
                raise SamplingError(f"--vae: {e}") from None

    @property
    def is_batch(self) -> bool:
        """A balanced batch of num_samples (an .npz, or returned), rather than a class grid."""
        return self.num_samples is not None and (self.out is None or Path(self.out).suffix.lower() == ".npz")

    def labels(self, num_classes: int) -> torch.Tensor:
        """The class of every sample, in order: balanced for a batch, `per_class` of each grid row."""
        if self.is_batch:
            return torch.arange(self.num_samples) % num_classes
        return torch.tensor(self.grid_classes(num_classes)).repeat_interleave(self.per_class)

    def grid_classes(self, num_classes: int) -> list[int]:
        return list(self.classes) if self.classes is not None else list(range(min(num_classes, GRID_CLASSES)))

    def check(self, module) -> None:
        """What the model decides: the sampler and step count its process allows, guidance only with a
        trained null class, guided channels within its latent channels, class ids within its classes."""
        process = module.diffusion
        if self.sampler is not None and self.sampler not in process.samplers:
            raise SamplingError(f"--sampler {self.sampler!r}: this checkpoint's {process.name} process has "
                                f"{', '.join(process.samplers)}")
        if self.steps is not None:
            if isinstance(process, GaussianDiffusion):
                limit = process.original_num_steps
                if self.steps > limit:
                    raise SamplingError(f"--steps {self.steps}: this checkpoint's gaussian process has {limit} "
                                        f"timesteps, so at most {limit} sampling steps")
                try:
                    process.respaced(self.steps)
                except (ValueError, TypeError) as e:
                    raise SamplingError(f"--steps {self.steps}: {e}") from None
            elif self.steps > MAX_FLOW_STEPS:
                raise SamplingError(f"--steps {self.steps}: at most {MAX_FLOW_STEPS} integration steps (the default "
                                    f"is {process.sampling_steps})")
        if self.cfg_scale != 1 and not has_null_class(module):
            raise SamplingError(f"--cfg-scale {self.cfg_scale:g}: this model was trained without label dropout "
                                "(class_dropout_prob 0), so it has no null class to guide with; sample with "
                                "--cfg-scale 1")
        channels = module.hparams.in_channels
        if self.guide_channels is not None and not 1 <= self.guide_channels <= channels:
            raise SamplingError(f"--guide-channels {self.guide_channels}: expected 1 to {channels} (the model's "
                                "latent channels)")
        num_classes = module.hparams.num_classes
        bad = [c for c in self.classes or () if not 0 <= c < num_classes]
        if bad:
            raise SamplingError(f"class id(s) {bad} out of range: this checkpoint has classes 0..{num_classes - 1}")
