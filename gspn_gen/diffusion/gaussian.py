"""ADM/DiT-compatible Gaussian diffusion: schedule, hybrid loss, respacing, DDPM and DDIM samplers.

Notation (Ho et al. 2020; Nichol & Dhariwal 2021, "IDDPM"):
  q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I),  abar_t = prod_{s<=t} (1 - beta_s), t = 0..T-1.
The model predicts eps (first C output channels) and, when `learn_sigma`, C more channels v in
[-1, 1] that interpolate the reverse-step log variance between log beta_t and the clipped log
posterior variance (IDDPM eq. 15). The loss is DiT's default: MSE(eps) plus, with learned sigma, the
VLB term in bits per dim computed on a detached mean (IDDPM §3.1's L_hybrid; DiT's `create_diffusion`
uses loss type MSE, so the VLB term is added unscaled). Without learned sigma the reverse variance is
the fixed posterior variance ("fixed small") and the loss is the plain MSE.

A process may keep only a subset of the original steps (respacing, `respace.py`); the model is then
always called with the ORIGINAL timestep, as a float in [0, T) (DESIGN.md §5). All schedule math is
float64; tensors are gathered per device and cast to the data's dtype at use.
"""

from __future__ import annotations

import copy
import math
from typing import Literal

import numpy as np
import torch

from .common import ModelFn, TrainingInput, loss_inputs, mean_flat
from .respace import space_timesteps

SAMPLERS = ("ddim", "ddpm")


def beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
    """float64 betas (T,). "linear": Ho et al.'s 1e-4..0.02 scaled by 1000/T (ADM/DiT's "linear");
    "cosine": IDDPM eq. 17 with max beta 0.999 (DiT's "squaredcos_cap_v2")."""
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if name == "linear":
        scale = 1000.0 / num_timesteps
        return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    if name == "cosine":
        s = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
        abar = np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2
        return np.minimum(1.0 - abar[1:] / abar[:-1], 0.999)
    raise ValueError(f"unknown noise_schedule {name!r}: expected 'linear' or 'cosine'")


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, means, log_scales) -> torch.Tensor:
    """log P(x) in nats, elementwise, of N(means, e^(2 log_scales)) integrated over x's 8-bit bin.

    Data are taken as 256 levels in [-1, 1] (bin half-width 1/255); the end bins extend to +-inf, as
    in Ho et al.'s decoder. Uses the exact normal CDF (ADM uses a tanh approximation).
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = torch.special.ndtr(inv_std * (centered + 1.0 / 255))
    cdf_min = torch.special.ndtr(inv_std * (centered - 1.0 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class GaussianDiffusion:
    """DDPM process with eps prediction (optionally learned-range sigma), respacing and samplers.

    Constructor arguments are the config schema (they travel in the checkpoint).
    """

    time_scale: float

    name = "gaussian"
    samplers = SAMPLERS

    def __init__(
        self,
        num_timesteps: int = 1000,
        noise_schedule: Literal["linear", "cosine"] = "linear",
        learn_sigma: bool = True,
        clip_denoised: bool = False,
        sampler: Literal["ddim", "ddpm"] = "ddim",
        sampling_steps: int | str = 50,
        eta: float = 0.0,
    ):
        """The training process over all `num_timesteps` steps; sampling respaces it (`respaced`).

        Args:
            num_timesteps: T of the training process.
            noise_schedule: linear (DiT) or cosine (IDDPM) betas.
            learn_sigma: the model outputs 2C channels, eps and the sigma interpolant (hybrid loss).
            clip_denoised: clamp x0 predictions to [-1, 1] when sampling (pixel space).
            sampler: default sampler of sample(): ddim or ddpm (ancestral).
            sampling_steps: default steps of sample(), or an ADM respacing spec ("25", "10,15,20", "ddim50").
            eta: DDIM noise scale (0: deterministic).
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}: expected one of {SAMPLERS}")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.config = {"num_timesteps": num_timesteps, "noise_schedule": noise_schedule,
                       "learn_sigma": learn_sigma, "clip_denoised": clip_denoised, "sampler": sampler,
                       "sampling_steps": sampling_steps, "eta": eta}
        self.learn_sigma = bool(learn_sigma)
        self.clip_denoised = bool(clip_denoised)
        self.sampler = sampler
        self.sampling_steps = sampling_steps
        self.eta = float(eta)
        self.original_num_steps = int(num_timesteps)
        self.time_scale = float(num_timesteps)
        self._base_abar = np.cumprod(1.0 - beta_schedule(noise_schedule, num_timesteps))
        self._keep(list(range(num_timesteps)))

    def _keep(self, kept: list[int]) -> None:
        """Make this the process over the original steps `kept` (sorted)."""
        # Respaced betas: 1 - abar[s_k] / abar[s_{k-1}], so abar matches the original at kept steps.
        abar_kept = self._base_abar[kept]
        betas = 1.0 - abar_kept / np.append(1.0, abar_kept[:-1])
        self.timestep_map = torch.tensor(kept, dtype=torch.long)
        self.num_timesteps = len(kept)
        self._tables = self._build_tables(betas)
        self._device_tables: dict[torch.device, dict[str, torch.Tensor]] = {}
        self._respaced: dict[str, GaussianDiffusion] = {}

    @staticmethod
    def _build_tables(betas: np.ndarray) -> dict[str, np.ndarray]:
        """float64 per-step coefficients (Ho et al. eqs. 4, 6, 7; IDDPM's clipped log variance)."""
        abar = np.cumprod(1.0 - betas)
        abar_prev = np.append(1.0, abar[:-1])
        post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
        # The posterior variance is 0 at t = 0; its log is clipped to the t = 1 value (as ADM).
        post_logvar = np.log(np.append(post_var[1], post_var[1:])) if len(betas) > 1 else np.log(betas)
        return {
            "betas": betas,
            "log_betas": np.log(betas),
            "alphas_cumprod": abar,
            "alphas_cumprod_prev": abar_prev,
            "sqrt_alphas_cumprod": np.sqrt(abar),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - abar),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / abar),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / abar - 1.0),
            "posterior_variance": post_var,
            "posterior_log_variance_clipped": post_logvar,
            "posterior_mean_coef1": betas * np.sqrt(abar_prev) / (1.0 - abar),
            "posterior_mean_coef2": (1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar),
        }

    def table(self, name: str) -> np.ndarray:
        """A float64 schedule array (T,) by name, e.g. "alphas_cumprod"."""
        return self._tables[name]

    def _on(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The schedule tables on `device` (float64; float32 on MPS, which has no float64), cached."""
        tables = self._device_tables.get(device)
        if tables is None:
            dtype = torch.float32 if device.type == "mps" else torch.float64
            tables = {k: torch.from_numpy(v).to(device, dtype) for k, v in self._tables.items()}
            tables["timestep_map"] = self.timestep_map.to(device)
            self._device_tables[device] = tables
        return tables

    def _coef(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """tables[name][t] shaped (N, 1, ..., 1) to broadcast against x, in x's dtype."""
        return self._on(t.device)[name][t].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Indices into this process (N,) -> original timesteps (N,) as float32: what the model sees."""
        return self._on(t.device)["timestep_map"][t].to(torch.float32)

    # ----------------------------------------------------------------------------------------------
    # Forward process and posterior

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0) with the given noise (Ho et al. eq. 4)."""
        return self._coef("sqrt_alphas_cumprod", t, x0) * x0 + \
            self._coef("sqrt_one_minus_alphas_cumprod", t, x0) * noise

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0) (Ho et al. eqs. 6-7)."""
        mean = self._coef("posterior_mean_coef1", t, x_t) * x0 + \
            self._coef("posterior_mean_coef2", t, x_t) * x_t
        var = self._coef("posterior_variance", t, x_t)
        logvar = self._coef("posterior_log_variance_clipped", t, x_t)
        return mean, var, logvar

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 implied by x_t and a noise prediction."""
        return self._coef("sqrt_recip_alphas_cumprod", t, x_t) * x_t - \
            self._coef("sqrt_recipm1_alphas_cumprod", t, x_t) * eps

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """Noise implied by x_t and an x_0 prediction."""
        return (self._coef("sqrt_recip_alphas_cumprod", t, x_t) * x_t - x0) / \
            self._coef("sqrt_recipm1_alphas_cumprod", t, x_t)

    # ----------------------------------------------------------------------------------------------
    # Reverse step p(x_{t-1} | x_t)

    def _split_output(self, out: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Model output (N, 2C or C, H, W) -> (eps, v or None), checking the channel count."""
        c = x.shape[1]
        want = 2 * c if self.learn_sigma else c
        if out.shape[0] != x.shape[0] or out.shape[1] != want or out.shape[2:] != x.shape[2:]:
            raise ValueError(
                f"model output has shape {tuple(out.shape)}, expected {(x.shape[0], want, *x.shape[2:])}"
                f" (learn_sigma={self.learn_sigma}: the model must output {want} channels)"
            )
        if self.learn_sigma:
            return out[:, :c], out[:, c:]
        return out, None

    def p_mean_variance(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor, clip: bool) -> dict:
        """Reverse-step Gaussian from a model output: mean, log_variance, pred_x0, eps."""
        eps, v = self._split_output(out.to(x.dtype), x)
        if v is None:
            logvar = self._coef("posterior_log_variance_clipped", t, x).expand_as(x)
        else:
            # IDDPM eq. 15: v in [-1, 1] maps to log variance between log(beta~_t) and log(beta_t).
            frac = (v + 1) / 2
            logvar = frac * self._coef("log_betas", t, x) + \
                (1 - frac) * self._coef("posterior_log_variance_clipped", t, x)
        pred_x0 = self.predict_x0(x, t, eps)
        if clip:
            pred_x0 = pred_x0.clamp(-1, 1)
            eps = self.predict_eps(x, t, pred_x0)
        mean, _, _ = self.q_posterior(pred_x0, x, t)
        return {"mean": mean, "log_variance": logvar, "pred_x0": pred_x0, "eps": eps}

    def _vb_bits(self, out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """VLB term per sample in bits/dim: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0 and
        the discretized decoder NLL -log p(x_0 | x_1) at t = 0 (Ho et al. eq. 5). (N,)"""
        true_mean, _, true_logvar = self.q_posterior(x0, x_t, t)
        p = self.p_mean_variance(out, x_t, t, clip=False)
        kl = mean_flat(normal_kl(true_mean, true_logvar, p["mean"], p["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"])
        nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    # ----------------------------------------------------------------------------------------------
    # Training

    def training_input(
        self,
        x0: torch.Tensor,                        # (N, C, H, W) clean data
        noise: torch.Tensor | None = None,       # (N, C, H, W); default randn
        t: torch.Tensor | None = None,           # (N,) long indices into this process; default uniform
    ) -> TrainingInput:
        """x_t ~ q(x_t | x_0) at uniform random steps, and the original timesteps the model sees."""
        noise, t = loss_inputs(x0, noise, t,
                               lambda n: torch.randint(0, self.num_timesteps, (n,), device=x0.device))
        return TrainingInput(self.q_sample(x0, t, noise), self.model_timesteps(t), noise, t)

    def training_losses(
        self,
        model: ModelFn,                          # model(x_t, t, y), t original timesteps as float
        x0: torch.Tensor,                        # (N, C, H, W) clean data
        y: torch.Tensor,                         # (N,) class ids
        noise: torch.Tensor | None = None,       # (N, C, H, W); default randn
        t: torch.Tensor | None = None,           # (N,) long indices into this process; default uniform
    ) -> dict[str, torch.Tensor]:
        """{"loss", "mse"[, "vb"]}, each (N,). loss = mse + vb (vb only with learn_sigma)."""
        x_t, t_model, noise, t = self.training_input(x0, noise, t)
        out = model(x_t, t_model, y)                                   # (N, 2C or C, H, W)
        dtype = torch.promote_types(x0.dtype, torch.float32)
        eps, v = self._split_output(out.to(dtype), x0)
        terms = {"mse": mean_flat((noise.to(dtype) - eps) ** 2)}
        if v is not None:
            # The VLB term trains only the variance: the mean it sees is detached (IDDPM §3.1).
            frozen = torch.cat([eps.detach(), v], dim=1)
            terms["vb"] = self._vb_bits(frozen, x0.to(dtype), x_t.to(dtype), t)
            terms["loss"] = terms["mse"] + terms["vb"]
        else:
            terms["loss"] = terms["mse"]
        return terms

    # ----------------------------------------------------------------------------------------------
    # Sampling

    def respaced(self, spec: int | str) -> GaussianDiffusion:
        """This process restricted to the steps kept by `spec` (cached); the model still sees
        original timesteps."""
        key = str(spec)
        if key not in self._respaced:
            process = copy.copy(self)
            process._keep(space_timesteps(self.original_num_steps, spec))
            self._respaced[key] = process
        return self._respaced[key]

    def _process_for(self, steps: int | str) -> GaussianDiffusion:
        """The process that samples in `steps` steps: self when it already has them."""
        if isinstance(steps, int) and not isinstance(steps, bool):
            if steps < 1:
                raise ValueError(f"steps must be >= 1, got {steps}")
            if steps == self.num_timesteps:
                return self
        return self.respaced(steps)

    def ddpm_step(self, model_fn: ModelFn, x: torch.Tensor, i: int, y: torch.Tensor, rng) -> dict:
        """One ancestral step x_i -> x_{i-1} of this process (Ho et al. Alg. 2); no noise at i = 0.
        Returns p_mean_variance's dict plus "sample"."""
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        p = self.p_mean_variance(model_fn(x, self.model_timesteps(t), y), x, t, self.clip_denoised)
        p["sample"] = p["mean"]
        if i > 0:
            z = rng.randn(x.shape[1:]).to(x.device, x.dtype)
            p["sample"] = p["mean"] + torch.exp(0.5 * p["log_variance"]) * z
        return p

    def ddim_step(self, model_fn: ModelFn, x: torch.Tensor, i: int, y: torch.Tensor, rng, eta: float) -> dict:
        """One DDIM step x_i -> x_{i-1} (Song et al. 2021 eq. 12; its sigma (eq. 16) times eta).
        Returns p_mean_variance's dict plus "sample"."""
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        p = self.p_mean_variance(model_fn(x, self.model_timesteps(t), y), x, t, self.clip_denoised)
        abar = float(self._tables["alphas_cumprod"][i])
        abar_prev = float(self._tables["alphas_cumprod_prev"][i])
        sigma = eta * math.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
        p["sample"] = p["pred_x0"] * math.sqrt(abar_prev) + math.sqrt(1 - abar_prev - sigma**2) * p["eps"]
        if sigma > 0:
            z = rng.randn(x.shape[1:]).to(x.device, x.dtype)
            p["sample"] = p["sample"] + sigma * z
        return p

    @torch.no_grad()
    def sample(
        self,
        model_fn: ModelFn,                       # model(x, t, y), e.g. guidance.cfg_model_fn(...)
        noise: torch.Tensor,                     # (N, C, H, W) initial x_T, e.g. rng.randn((C, H, W))
        y: torch.Tensor,                         # (N,) class ids, passed to model_fn unchanged
        rng=None,                                # PerSampleRNG for the step noise (DDPM, DDIM eta > 0)
        sampler: str | None = None,              # "ddim" | "ddpm"; default self.sampler
        steps: int | str | None = None,          # step count or respacing spec; default self.sampling_steps
        progress: bool = False,                  # tqdm bar
        *,
        eta: float | None = None,                # DDIM eta; default self.eta
    ) -> torch.Tensor:
        """Generate x_0 (N, C, H, W) from x_T = noise with the respaced process for `steps`."""
        sampler = self.sampler if sampler is None else sampler
        steps = self.sampling_steps if steps is None else steps
        eta = self.eta if eta is None else float(eta)
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}: expected one of {SAMPLERS}")
        needs_rng = sampler == "ddpm" or eta > 0
        if needs_rng and rng is None:
            raise ValueError(f"sampler {sampler!r} (eta={eta}) draws noise: pass rng=PerSampleRNG(...)")
        if needs_rng and len(rng) != noise.shape[0]:
            raise ValueError(f"rng has {len(rng)} streams for a batch of {noise.shape[0]}")
        process = self._process_for(steps)
        x = noise
        order = range(process.num_timesteps - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm
            order = tqdm(order, desc=f"{sampler} {process.num_timesteps} steps")
        for i in order:
            if sampler == "ddpm":
                x = process.ddpm_step(model_fn, x, i, y, rng)["sample"]
            else:
                x = process.ddim_step(model_fn, x, i, y, rng, eta)["sample"]
        return x
