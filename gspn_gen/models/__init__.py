"""Diffusion backbones with a GSPN or attention token mixer, and their named presets."""

from gspn_gen.models.backbone import DiffusionBackbone
from gspn_gen.models.mixer import AttentionConfig, AttentionMixer, GSPNConfig, GSPNMixer

__all__ = ["MODELS", "AttentionConfig", "AttentionMixer", "DiffusionBackbone", "GSPNConfig", "GSPNMixer",
           "build_model", "list_models"]


def __getattr__(name: str):
    # The registry loads on first use, so `python -m gspn_gen.models.zoo` runs zoo only once.
    if name in ("MODELS", "build_model", "list_models"):
        from gspn_gen.models import zoo

        return getattr(zoo, name)
    raise AttributeError(f"module 'gspn_gen.models' has no attribute {name!r}")
