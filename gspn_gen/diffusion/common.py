"""What every diffusion process shares: the model-call type, `mean_flat`, and the opening of
`training_losses` (default noise and times, checked shapes), which each process's `training_input` wraps."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""model(x_t, t, y) -> output: a backbone, or a wrapper of one such as guidance.cfg_model_fn."""


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all but the batch dimension: (N, ...) -> (N,)."""
    return x.mean(dim=tuple(range(1, x.dim())))


class TrainingInput(NamedTuple):
    """What a process feeds its model in one training step (`training_input`), and how it got there."""

    x_t: torch.Tensor       # (N, C, H, W) the noisy input
    t_model: torch.Tensor   # (N,) float32: the times the model sees
    noise: torch.Tensor     # (N, C, H, W) the noise mixed into x_0
    t: torch.Tensor         # (N,) the process's own times (indices for the Gaussian process)


def loss_inputs(
    x0: torch.Tensor,                            # (N, C, H, W) clean data
    noise: torch.Tensor | None,                  # (N, C, H, W) or None: standard normal
    t: torch.Tensor | None,                      # (N,) or None: draw_t(N)
    draw_t: Callable[[int], torch.Tensor],       # the process's default times for a batch of N
) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise, t) of a training batch: the given ones after a shape check, else freshly drawn."""
    n = x0.shape[0]
    if t is None:
        t = draw_t(n)
    if noise is None:
        noise = torch.randn_like(x0)
    if noise.shape != x0.shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(x0.shape)}")
    if t.shape != (n,):
        raise ValueError(f"t has shape {tuple(t.shape)}, expected ({n},)")
    return noise, t
