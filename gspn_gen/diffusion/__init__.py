"""Diffusion processes, samplers, guidance and per-sample seeds (DESIGN.md §5).

Knows nothing of the architecture: every process calls `model(x_t, t, y)`. A process is chosen in a
config as `diffusion: {class_path: GaussianDiffusion | FlowMatching, init_args: {...}}`; its
constructor arguments are the schema, and `describe` / `from_description` turn a process into that
plain form (as checkpoints store it) and back.
"""

from __future__ import annotations

from .common import ModelFn, mean_flat
from .flow import FlowMatching
from .gaussian import GaussianDiffusion
from .guidance import cfg_model_fn
from .respace import space_timesteps
from .rng import PerSampleRNG

Process = GaussianDiffusion | FlowMatching
KINDS = {"gaussian": GaussianDiffusion, "flow": FlowMatching}

__all__ = [
    "KINDS",
    "FlowMatching",
    "GaussianDiffusion",
    "ModelFn",
    "PerSampleRNG",
    "Process",
    "cfg_model_fn",
    "describe",
    "from_description",
    "mean_flat",
    "space_timesteps",
]


def describe(process: Process) -> dict:
    """{"class_path", "init_args"} of a process: its config form, plain containers only."""
    cls = type(process)
    return {"class_path": f"{cls.__module__}.{cls.__name__}", "init_args": dict(process.config)}


def from_description(spec: dict) -> Process:
    """The process of a {"class_path", "init_args"} dict; only our processes, never an arbitrary import."""
    path = str(spec.get("class_path", ""))
    for cls in KINDS.values():
        if path in (cls.__name__, f"{cls.__module__}.{cls.__name__}", f"{__name__}.{cls.__name__}"):
            try:
                return cls(**(spec.get("init_args") or {}))
            except TypeError as e:  # an argument the process does not take
                raise ValueError(f"diffusion {cls.__name__}: {e}") from None
    known = ", ".join(cls.__name__ for cls in KINDS.values())
    raise ValueError(f"unknown diffusion class_path {path!r}: expected one of {known}")
