"""Named size presets: the single registry `MODELS`, `build_model`, `list_models`.

`python -m gspn_gen.models.zoo` prints one row per preset: name, parameters (M), GFLOPs of one
forward of one image at DiffusionBackbone's default data shape (32x32x4 latents = 256 px, 1000
classes; a training run takes the shape from its data), counted on the meta device in seconds.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from unittest import mock

import torch
from torch.utils.flop_counter import FlopCounterMode

from gspn_gen.models import mixer as mixer_module
from gspn_gen.models.backbone import DiffusionBackbone
from gspn_gen.models.mixer import GSPNMixer

# What the data and the diffusion process decide, never a preset: the generator's input shape and
# classes (from the datamodule) and whether it outputs sigma (from the process). Presets built alone
# (the table below, tests) take DiffusionBackbone's defaults: ImageNet 256 px latents, 32x32x4, 1000 classes.
DATA_FIELDS = ("input_size", "in_channels", "num_classes", "learn_sigma")
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
    return models


MODELS: dict[str, dict] = _presets()
"""Preset name -> DiffusionBackbone constructor arguments."""


def _model_args_class() -> type:
    """A dataclass with one optional field per DiffusionBackbone argument except DATA_FIELDS, typed as
    the backbone types it, so the CLI lists, types and checks every override."""
    hints = typing.get_type_hints(DiffusionBackbone.__init__)
    names = [n for n in inspect.signature(DiffusionBackbone).parameters if n not in DATA_FIELDS]
    cls = dataclasses.make_dataclass(
        "ModelArgs", [(n, hints[n] | None, dataclasses.field(default=None)) for n in names],
        frozen=True)
    cls.__module__ = __name__
    cls.__doc__ = ("Overrides of the preset's backbone arguments (gspn_gen.models.backbone.DiffusionBackbone); "
                   "null keeps the preset's value. The input shape and classes come from the data, "
                   "learn_sigma from the diffusion process.")
    return cls


ModelArgs = _model_args_class()
NO_OVERRIDES = ModelArgs()
"""Every preset value kept (the default of GenerationModule's model_args)."""


def model_overrides(args) -> dict:
    """The fields of a ModelArgs (or a dict of them) that are set: {name: value}, Nones dropped."""
    if args is None:
        return {}
    if not isinstance(args, ModelArgs):
        try:
            args = ModelArgs(**dict(args))
        except TypeError as e:
            fields = ", ".join(f.name for f in dataclasses.fields(ModelArgs))
            raise ValueError(f"model_args {dict(args)}: {e}; accepted: {fields} (the input shape and classes "
                             "come from the data, learn_sigma from the diffusion)") from None
    return {k: v for k, v in dataclasses.asdict(args).items() if v is not None}


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
        size = model.grid[0] * model.patch_size
        print(f"{name:<18} {count_params(model) / 1e6:>11.1f} {count_flops(model, size) / 1e9:>9.2f}  "
              f"{model.in_channels}x{size}x{size}, {model.num_classes} classes")


if __name__ == "__main__":
    main()
