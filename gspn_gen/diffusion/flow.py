"""Flow matching with SiT's linear interpolant and velocity prediction.

Convention (ours; documented because SiT uses the mirror image):
  x_t = (1 - t) x_0 + t n,   n ~ N(0, I),   t in [0, 1]:  t = 0 is data, t = 1 is pure noise.
The model predicts the velocity v = dx_t/dt = n - x_0, and sampling integrates from t = 1 down to
t = 0. Time runs the same way as in the Gaussian process (noise at large t), so a guidance interval
(lo, hi) on t / time_scale means the same region for both. SiT's "Linear" path uses t_SiT = 1 - t and
v_SiT = x_0 - n = -v; `python -m gspn_gen.checkpoints import-sit` folds both flips into a SiT
checkpoint's weights (gspn_gen.checkpoints.convert).

Samplers over a uniform grid t_k = 1 - k / steps:
  "euler"  x <- x + (t_next - t) v(x, t)                      (steps model calls)
  "heun"   Euler predictor, trapezoid corrector on every step (2 * steps model calls)
  "sde"    Euler-Maruyama on the reverse SDE with SiT's default diffusion coefficient w(t) = sigma_t
           (form "sigma", norm 1; here sigma_t = t). With score s = -((1 - t) v + x) / t it reads
           dx = [v - w s] dt + sqrt(2 w) dW backwards in t, i.e. per step of size h
           x <- x - h (v + norm ((1 - t) v + x)) + sqrt(2 norm t h) z,
           and the last step adds no noise. (SiT's own grid differs slightly: 249 noisy steps up to
           s = 0.96, then one noise-free "Mean" step of 0.04.)
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from .common import ModelFn, TrainingInput, loss_inputs, mean_flat

SAMPLERS = ("euler", "heun", "sde")


class FlowMatching:
    """Linear-interpolant flow matching (SiT), velocity prediction; Euler, Heun and SDE samplers.

    Constructor arguments are the config schema (they travel in the checkpoint).
    """

    name = "flow"
    samplers = SAMPLERS
    learn_sigma = False
    time_scale = 1.0

    def __init__(
        self,
        sampler: Literal["euler", "heun", "sde"] = "heun",
        sampling_steps: int = 25,
        diffusion_norm: float = 1.0,
    ):
        """Args:
            sampler: default sampler of sample(): euler, heun (ODE) or sde (Euler-Maruyama).
            sampling_steps: default integration steps of sample().
            diffusion_norm: SDE sampler's diffusion coefficient w(t) = diffusion_norm * t.
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}: expected one of {SAMPLERS}")
        if sampling_steps < 1:
            raise ValueError(f"sampling_steps must be >= 1, got {sampling_steps}")
        if diffusion_norm < 0:
            raise ValueError(f"diffusion_norm must be >= 0, got {diffusion_norm}")
        self.config = {"sampler": sampler, "sampling_steps": sampling_steps, "diffusion_norm": diffusion_norm}
        self.sampler = sampler
        self.sampling_steps = int(sampling_steps)
        self.diffusion_norm = float(diffusion_norm)

    @staticmethod
    def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = (1 - t) x_0 + t n, t (N,) broadcast over the sample dimensions."""
        tt = t.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
        return (1 - tt) * x0 + tt * noise

    def velocity(self, model_fn: ModelFn, x: torch.Tensor, t: float, y: torch.Tensor) -> torch.Tensor:
        """Model velocity at x (N, C, H, W) and scalar time t, in x's dtype."""
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
        return self._check(model_fn(x, tt, y), x).to(x.dtype)

    @staticmethod
    def _check(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if out.shape != x.shape:
            raise ValueError(
                f"model output has shape {tuple(out.shape)}, expected {tuple(x.shape)} "
                "(flow matching predicts a velocity with C channels: build the model with learn_sigma=False)"
            )
        return out

    def training_input(
        self,
        x0: torch.Tensor,                        # (N, C, H, W) clean data
        noise: torch.Tensor | None = None,       # (N, C, H, W); default randn
        t: torch.Tensor | None = None,           # (N,) float in [0, 1]; default uniform
    ) -> TrainingInput:
        """x_t on the straight path at uniform random times, and those times (what the model sees)."""
        noise, t = loss_inputs(x0, noise, t, lambda n: torch.rand(n, device=x0.device))
        return TrainingInput(self.interpolate(x0, noise, t), t.to(torch.float32), noise, t)

    def training_losses(
        self,
        model: ModelFn,                          # model(x_t, t, y), t float in [0, 1]
        x0: torch.Tensor,                        # (N, C, H, W) clean data
        y: torch.Tensor,                         # (N,) class ids
        noise: torch.Tensor | None = None,       # (N, C, H, W); default randn
        t: torch.Tensor | None = None,           # (N,) float in [0, 1]; default uniform
    ) -> dict[str, torch.Tensor]:
        """{"loss", "mse"}, each (N,): velocity MSE, mean over dimensions (SiT, no weighting)."""
        x_t, t_model, noise, t = self.training_input(x0, noise, t)
        out = self._check(model(x_t, t_model, y), x0)                  # (N, C, H, W)
        dtype = torch.promote_types(x0.dtype, torch.float32)
        mse = mean_flat((out.to(dtype) - (noise - x0).to(dtype)) ** 2)
        return {"loss": mse, "mse": mse}

    @torch.no_grad()
    def sample(
        self,
        model_fn: ModelFn,                       # model(x, t, y), e.g. guidance.cfg_model_fn(...)
        noise: torch.Tensor,                     # (N, C, H, W) x at t = 1, e.g. rng.randn((C, H, W))
        y: torch.Tensor,                         # (N,) class ids, passed to model_fn unchanged
        rng=None,                                # PerSampleRNG for the SDE noise
        sampler: str | None = None,              # "euler" | "heun" | "sde"; default self.sampler
        steps: int | None = None,                # integration steps; default self.sampling_steps
        progress: bool = False,                  # tqdm bar
    ) -> torch.Tensor:
        """Integrate from t = 1 (x = noise) to t = 0; returns x_0 (N, C, H, W)."""
        sampler = self.sampler if sampler is None else sampler
        steps = self.sampling_steps if steps is None else steps
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}: expected one of {SAMPLERS}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if sampler == "sde":
            if rng is None:
                raise ValueError("sampler 'sde' draws noise: pass rng=PerSampleRNG(...)")
            if len(rng) != noise.shape[0]:
                raise ValueError(f"rng has {len(rng)} streams for a batch of {noise.shape[0]}")
        ts = [1.0 - k / steps for k in range(steps + 1)]
        ts[-1] = 0.0
        order = range(steps)
        if progress:
            from tqdm.auto import tqdm
            order = tqdm(order, desc=f"{sampler} {steps} steps")
        x = noise
        for k in order:
            t, t_next = ts[k], ts[k + 1]
            v = self.velocity(model_fn, x, t, y)
            if sampler == "euler":
                x = x + (t_next - t) * v
            elif sampler == "heun":
                x_pred = x + (t_next - t) * v
                v_next = self.velocity(model_fn, x_pred, t_next, y)
                x = x + (t_next - t) * 0.5 * (v + v_next)
            else:
                h, norm = t - t_next, self.diffusion_norm
                x = x - h * (v + norm * ((1 - t) * v + x))
                if k < steps - 1:
                    z = rng.randn(x.shape[1:]).to(x.device, x.dtype)
                    x = x + math.sqrt(2 * norm * t * h) * z
        return x
