"""Named size presets: the single registry `MODELS`, `build_model`, `list_models`.

`python -m gspn_gen.models.zoo` prints one row per preset: name, parameters (M), GFLOPs of one
forward of one image at DiffusionBackbone's default data shape (32x32x4 latents = 256 px, 1000
classes; a training run takes the shape from its data), counted on the meta device in seconds.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch.utils.flop_counter import FlopCounterMode

from gspn_gen.models.backbone import DiffusionBackbone
from gspn_gen.models.mixer import AttentionConfig, GSPNConfig, GSPNMixer

# What the data and the diffusion process decide, never a preset: the generator's input shape and
# classes (from the datamodule) and whether it outputs sigma (from the process). Presets built alone
# (the table below, tests) take DiffusionBackbone's defaults: ImageNet 256 px latents, 32x32x4, 1000 classes.
DATA_FIELDS = ("input_size", "in_channels", "num_classes", "learn_sigma")


@dataclasses.dataclass(frozen=True)
class ModelArgs:
    """Overrides of the preset's backbone arguments (DiffusionBackbone and its mixer's config); null keeps
    the preset's value. The input shape and classes come from the data, learn_sigma from the diffusion
    process. A preset in MODELS sets these same fields."""

    # DiffusionBackbone
    patch_size: int | None = None
    hidden_size: int | None = None
    depth: int | None = None                  # number of blocks
    num_heads: int | None = None              # attention heads (AttentionConfig; GSPN ignores it)
    mlp_ratio: float | None = None            # MLP width / hidden_size; 0: no MLP
    class_dropout_prob: float | None = None   # training-time share of labels replaced by the null id
    mixer: Literal["gspn", "attention"] | None = None  # GSPNConfig or AttentionConfig
    paper_layout: bool | None = None          # the official GSPN generator's layout
    # GSPNConfig (attention ignores them)
    chunk: int | None = None                  # local layers scan in blocks of `chunk` lines
    global_layers: int | None = None          # the last `global_layers` blocks scan globally
    proxy_dim: int | None = None              # width the gates, lam and u are projected from
    channels_per_gate: int | None = None      # compact gates: Cg = scan width / k
    conv_kernel: int | None = None            # depthwise conv size
    direct_term: bool | None = None           # x * D term (official generator)
    conv_out: bool | None = None              # official output path
    scan_dim: int | None = None               # propagation width (GSPN-2 compact)
    recompute: bool | None = None             # recompute the mixer's maps in backward (less memory)
    gspn_backend: Literal["auto", "cuda", "cuda-cluster", "cuda-portable", "cpu", "torch", "reference"] | None = None  # GSPNConfig.backend
    # DiffusionBackbone
    fixed_pos_embed: bool | None = None       # DiT's sin-cos position embedding (default: attention only)


NO_OVERRIDES = ModelArgs()
"""Every preset value kept (the default of GenerationModule's model_args)."""
ARG_NAMES = tuple(f.name for f in dataclasses.fields(ModelArgs))

_COMMON = {"class_dropout_prob": 0.1}

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
            models[f"DiT-{size}/{p}"] = {**sized(_COMMON, *shape), "patch_size": p, "mixer": "attention"}
    # The GPU presets recompute the mixer's maps in backward (GSPNMixer `recompute`): a GSPN-XL/2 block
    # then keeps less for backward than a DiT-XL/2 block (benchmarks/memory.py).
    for size, shape in _DIT_SIZES.items():
        for p in (2, 4):
            models[f"GSPN-{size}/{p}"] = {**sized(_COMMON, *shape), "patch_size": p, "mixer": "gspn",
                                          "recompute": True}
    for size, (width, depth) in _PAPER_SIZES.items():
        for p in (2, 4):
            models[f"GSPN-paper-{size}/{p}"] = {
                **_COMMON, "hidden_size": width, "depth": depth, "patch_size": p, **_PAPER_LAYER,
            }
    # CPU demo presets; GSPN-T uses compact gates (one gate channel per 4 channels, GSPN-2) to
    # cut the scan's memory traffic, which dominates a CPU step at this width. No recomputation: at
    # this size memory is no constraint, and it would cost ~18% of a CPU training step.
    for p in (1, 2, 4):
        models[f"DiT-T/{p}"] = {**sized(_COMMON, 128, 6, 4), "patch_size": p, "mixer": "attention"}
        models[f"GSPN-T/{p}"] = {**sized(_COMMON, 128, 6, 4), "patch_size": p, "mixer": "gspn",
                                 "channels_per_gate": 4}
    for settings in models.values():
        ModelArgs(**settings)  # a misspelt field fails at import
    return models


MODELS: dict[str, dict] = _presets()
"""Preset name -> its settings, by ModelArgs field name (`backbone_args` turns them into the backbone's)."""


def model_overrides(args) -> dict:
    """The fields of a ModelArgs (or a dict of them) that are set: {name: value}, Nones dropped."""
    if args is None:
        return {}
    if not isinstance(args, ModelArgs):
        try:
            args = ModelArgs(**dict(args))
        except TypeError as e:
            raise ValueError(f"model_args {dict(args)}: {e}; accepted: {', '.join(ARG_NAMES)} (the input shape and "
                             "classes come from the data, learn_sigma from the diffusion)") from None
    return {k: v for k, v in dataclasses.asdict(args).items() if v is not None}


def backbone_args(settings: dict) -> dict:
    """Preset settings (ModelArgs fields and DATA_FIELDS, by name) -> DiffusionBackbone's arguments, the
    mixer's gathered into its config."""
    args = dict(settings)
    kind = args.pop("mixer", "gspn")
    heads = {"num_heads": args.pop("num_heads")} if "num_heads" in args else {}
    gspn = {f.name: args.pop(f.name) for f in dataclasses.fields(GSPNConfig) if f.name in args}
    if "gspn_backend" in args:
        gspn["backend"] = args.pop("gspn_backend")
    if kind == "attention":
        return {**args, "mixer": AttentionConfig(**heads)}
    if kind == "gspn":
        return {**args, "mixer": GSPNConfig(**gspn)}
    raise ValueError(f"mixer must be 'gspn' or 'attention', got {kind!r}")


def list_models() -> list[str]:
    """Preset names, in registry order."""
    return list(MODELS)


def build_model(name: str, **overrides) -> DiffusionBackbone:
    """The preset `name` with constructor arguments replaced by `overrides` (input_size, depth, ...)."""
    if name not in MODELS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(MODELS)}")
    accepted = ARG_NAMES + DATA_FIELDS
    unknown = sorted(set(overrides) - set(accepted))
    if unknown:
        raise ValueError(f"unknown model argument(s) {unknown} for {name!r}; accepted: {', '.join(accepted)}")
    return DiffusionBackbone(**backbone_args({**MODELS[name], **overrides}))


def count_params(model: torch.nn.Module) -> int:
    """All parameters, the frozen position embedding included (DiT's convention: DiT-XL/2 = 675.1M)."""
    return sum(p.numel() for p in model.parameters())


def count_flops(model: DiffusionBackbone, input_size: int) -> int:
    """FLOPs (a multiply-add counts 2) of one forward of one input_size x input_size image.

    Matmuls, convolutions and attention are counted by torch's FlopCounterMode, the GSPN scans by
    `GSPNMixer.scan_flops`. On a meta-device model nothing is computed (the scan's meta kernel only
    makes an empty output); on another device the forward runs. DiT's paper reports fvcore counts (a
    multiply-add counts 1): half of these.
    """
    device = next(model.parameters()).device
    x = torch.zeros(1, model.in_channels, input_size, input_size, device=device)
    t = torch.zeros(1, device=device)
    y = torch.zeros(1, dtype=torch.long, device=device)
    grid = (input_size // model.patch_size, input_size // model.patch_size)
    scans = sum(m.scan_flops(1, grid) for m in model.modules() if isinstance(m, GSPNMixer))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(x, t, y)
    return counter.get_total_flops() + scans


def main() -> None:
    print(f"{'preset':<18} {'params (M)':>11} {'GFLOPs':>9}  input")
    for name in MODELS:
        with torch.device("meta"):
            model = build_model(name)
        size = model.grid[0] * model.patch_size
        print(f"{name:<18} {count_params(model) / 1e6:>11.1f} {count_flops(model, size) / 1e9:>9.2f}  "
              f"{model.in_channels}x{size}x{size}, {model.num_classes} classes")


if __name__ == "__main__":
    main()
