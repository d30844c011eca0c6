"""Named size presets: the single registry `MODELS`, `build_model`, `list_models`.

`python -m gspn_gen.models.zoo` prints one row per preset: name, parameters (M), GFLOPs of one
forward of one image at its default input size (32x32 latents = 256 px for the ImageNet presets),
counted on the meta device in seconds.
"""

from __future__ import annotations

import inspect
from unittest import mock

import torch
from torch.utils.flop_counter import FlopCounterMode

from gspn_gen.models import mixer as mixer_module
from gspn_gen.models.backbone import DiffusionBackbone
from gspn_gen.models.mixer import GSPNMixer

# ImageNet 256 px through the SD VAE (32x32x4 latents, 1000 classes); the tiny CPU presets default to
# the embedded digits (16x16 grey, 10 classes).
_IMAGENET = {"input_size": 32, "in_channels": 4, "num_classes": 1000, "learn_sigma": True, "class_dropout_prob": 0.1}
_TINY = {"input_size": 16, "in_channels": 1, "num_classes": 10, "learn_sigma": True, "class_dropout_prob": 0.1}

# DiT's widths / depths / heads (Peebles & Xie 2023, Table 1).
_DIT_SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}

# The official GSPN generator: widths 900/1200/1500; its "depth" 30/56/56 builds depth // 2 in-blocks,
# a middle block and depth // 2 out-blocks, i.e. 31/57/57 blocks; our depth counts blocks. Its layer:
# 7x7 depthwise conv, proxy width hidden // 16, a D term, a 1x1 + depthwise 3x3 + y*relu(y) output
# path, no MLP; local layers scan in chunks of 2 lines, the last 2 layers (meant to be) global.
_PAPER_SIZES = {"B": (900, 31), "L": (1200, 57), "XL": (1500, 57)}
_PAPER_LAYER = {
    "mixer": "gspn", "paper_layout": True, "mlp_ratio": 0.0, "chunk": 2, "global_layers": 2,
    "conv_kernel": 7, "direct_term": True, "conv_out": True, "recompute": True,
}


def _presets() -> dict[str, dict]:
    models: dict[str, dict] = {}
    def sized(base: dict, width: int, depth: int, heads: int) -> dict:
        return {**base, "hidden_size": width, "depth": depth, "num_heads": heads, "mlp_ratio": 4.0}

    for size, shape in _DIT_SIZES.items():
        for p in (2, 4, 8):
            models[f"DiT-{size}/{p}"] = {**sized(_IMAGENET, *shape), "patch_size": p, "mixer": "attention"}
    # The GPU presets recompute the mixer's maps in backward (GSPNMixer `recompute`): a GSPN-XL/2 block
    # then keeps less for backward than a DiT-XL/2 block (benchmarks/memory.py).
    for size, shape in _DIT_SIZES.items():
        for p in (2, 4):
            models[f"GSPN-{size}/{p}"] = {**sized(_IMAGENET, *shape), "patch_size": p, "mixer": "gspn",
                                          "recompute": True}
    for size, (width, depth) in _PAPER_SIZES.items():
        for p in (2, 4):
            models[f"GSPN-paper-{size}/{p}"] = {
                **_IMAGENET, "hidden_size": width, "depth": depth, "patch_size": p, **_PAPER_LAYER,
            }
    # CPU demo presets; GSPN-T uses compact gates (one gate channel per 4 channels, GSPN-2) to
    # cut the scan's memory traffic, which dominates a CPU step at this width. No recomputation: at
    # this size memory is no constraint, and it would cost ~18% of a CPU training step.
    for p in (1, 2, 4):
        models[f"DiT-T/{p}"] = {**sized(_TINY, 128, 6, 4), "patch_size": p, "mixer": "attention"}
        models[f"GSPN-T/{p}"] = {**sized(_TINY, 128, 6, 4), "patch_size": p, "mixer": "gspn",
                                 "channels_per_gate": 4}
    return models


MODELS: dict[str, dict] = _presets()
"""Preset name -> DiffusionBackbone constructor arguments."""


def list_models() -> list[str]:
    """Preset names, in registry order."""
    return list(MODELS)


def build_model(name: str, **overrides) -> DiffusionBackbone:
    """The preset `name` with constructor arguments replaced by `overrides` (input_size, depth, ...)."""
    if name not in MODELS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(MODELS)}")
    accepted = inspect.signature(DiffusionBackbone).parameters
    unknown = sorted(set(overrides) - set(accepted))
    if unknown:
        raise ValueError(f"unknown model argument(s) {unknown} for {name!r}; accepted: {', '.join(accepted)}")
    return DiffusionBackbone(**{**MODELS[name], **overrides})


def count_params(model: torch.nn.Module) -> int:
    """All parameters, the frozen position embedding included (DiT's convention: DiT-XL/2 = 675.1M)."""
    return sum(p.numel() for p in model.parameters())


def count_flops(model: DiffusionBackbone, input_size: int) -> int:
    """FLOPs (a multiply-add counts 2) of one forward of one input_size x input_size image.

    Matmuls, convolutions and attention are counted by torch's FlopCounterMode, the GSPN scans by
    `GSPNMixer.scan_flops`; the scan itself is not run. On a meta-device model nothing is computed.
    DiT's paper reports fvcore counts (a multiply-add counts 1): half of these.
    """
    device = next(model.parameters()).device
    x = torch.zeros(1, model.in_channels, input_size, input_size, device=device)
    t = torch.zeros(1, device=device)
    y = torch.zeros(1, dtype=torch.long, device=device)
    grid = (input_size // model.patch_size, input_size // model.patch_size)
    scans = sum(m.scan_flops(1, grid) for m in model.modules() if isinstance(m, GSPNMixer))

    def skip_scan(x, gate_logits, lam, u, chunk=None, backend="auto"):
        return torch.zeros_like(x)

    counter = FlopCounterMode(display=False)
    with mock.patch.object(mixer_module, "gspn_mix", skip_scan), counter, torch.no_grad():
        model.eval()(x, t, y)
    return counter.get_total_flops() + scans


def main() -> None:
    print(f"{'preset':<18} {'params (M)':>11} {'GFLOPs':>9}  input")
    for name in MODELS:
        with torch.device("meta"):
            model = build_model(name)
        size = MODELS[name]["input_size"]
        print(f"{name:<18} {count_params(model) / 1e6:>11.1f} {count_flops(model, size) / 1e9:>9.2f}  "
              f"{MODELS[name]['in_channels']}x{size}x{size}")


if __name__ == "__main__":
    main()
