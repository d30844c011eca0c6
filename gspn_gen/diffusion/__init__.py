"""Diffusion processes, samplers, guidance and per-sample seeds (DESIGN.md §5).

Knows nothing of the architecture: every process calls `model(x_t, t, y)`.
"""

from .flow import FlowMatching
from .gaussian import GaussianDiffusion
from .guidance import cfg_model_fn
from .respace import space_timesteps
from .rng import PerSampleRNG

KINDS = {"gaussian": GaussianDiffusion, "flow": FlowMatching}

__all__ = [
    "KINDS",
    "FlowMatching",
    "GaussianDiffusion",
    "PerSampleRNG",
    "cfg_model_fn",
    "create_diffusion",
    "space_timesteps",
]


def create_diffusion(kind: str = "gaussian", **kwargs) -> GaussianDiffusion | FlowMatching:
    """Build a process by kind ("gaussian" or "flow"); kwargs go to its constructor."""
    if kind not in KINDS:
        raise ValueError(f"unknown diffusion kind {kind!r}: expected one of {sorted(KINDS)}")
    return KINDS[kind](**kwargs)
