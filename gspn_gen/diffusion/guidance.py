"""Classifier-free guidance (Ho & Salimans 2022) on ALL latent channels, with an optional interval.

out = uncond + scale * (cond - uncond) on the first C = x.shape[1] output channels. DiT, SiT, GSPN
and LightningDiT guide only the first 3 channels (a leftover from pixel-space code), which leaves the
4th SD-VAE latent channel unguided; we guide them all. Extra output channels (the learned sigma) come
from the conditional half. With interval=(lo, hi), guidance applies only where lo <= t / time_scale
<= hi (Kynkaanniemi et al. 2024, "guidance in a limited interval"); elsewhere the conditional output
is used and, when no sample of the batch is inside the interval, the null half is not computed.
With channels=k only the first k channels are guided and the others come from the conditional half,
which is exactly what official DiT/SiT sampling does with k = 3 (to reproduce their published numbers).
The scale, interval and channel count arrive validated (gspn_gen.sampling.request): 0 <= scale, 0 <= lo
<= hi <= 1, 1 <= channels <= the samples' channels.
"""

from __future__ import annotations

import torch

from .common import ModelFn


def cfg_model_fn(
    model: ModelFn,                              # model(x, t, y) -> (N, C or more, H, W)
    scale: float,                                # guidance scale; 1 = no guidance
    null_class: int,                             # label of the unconditional ("null") class
    interval: tuple[float, float] | None = None, # guide only for lo <= t / time_scale <= hi
    time_scale: float = 1000.0,                  # the diffusion's time_scale (1000 DDPM, 1 flow)
    channels: int | None = None,                 # guide only the first `channels`; None: all of x's
) -> ModelFn:
    """A model_fn(x, t, y) that returns the guided output; `model` itself when scale == 1."""
    scale = float(scale)
    if scale == 1.0:
        return model
    if interval is not None:
        lo, hi = (float(v) for v in interval)

    def guided(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        k = x.shape[1] if channels is None else channels
        if interval is None:
            active = None
        else:
            s = t.to(torch.float32) / time_scale
            active = (s >= lo) & (s <= hi)                                    # (N,)
            if not bool(active.any()):
                return model(x, t, y)
        y_null = torch.full_like(y, null_class)
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null]))  # (2N, C', H, W)
        cond, uncond = out.chunk(2, dim=0)                                    # (N, C', H, W) each
        eps = uncond[:, :k] + scale * (cond[:, :k] - uncond[:, :k])           # (N, k, H, W)
        if active is not None:
            eps = torch.where(active.view(-1, *([1] * (x.dim() - 1))), eps, cond[:, :k])
        return torch.cat([eps, cond[:, k:]], dim=1)

    return guided
