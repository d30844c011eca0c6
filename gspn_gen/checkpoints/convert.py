"""Official DiT/SiT checkpoints in: `python -m gspn_gen.checkpoints import-dit|import-sit` (DESIGN.md §10).

Import. The official checkpoints (facebookresearch/DiT `DiT-XL-2-256x256.pt`, willisma/SiT
`SiT-XL-2-256x256.pt`) are plain state dicts of EMA weights (a train.py checkpoint holds them under
"ema"). Our DiT presets have the same keys and shapes except `blocks.N.attn.*` -> `blocks.N.mixer.*`,
so import renames those keys, reads the preset from the shapes and writes a checkpoint that
`load_module`, `sample.py` and `fid_eval` take like a trained one: the weights as both `model.*` and
`ema.*` (one stored copy), 1000 classes, the SD VAE codec with scale 0.18215, and the sampling
protocol of the paper as the default (DiT: 250 DDPM steps; SiT: 250 SDE steps).

SiT's conventions are the mirror image of our flow process (gspn_gen/diffusion/flow.py):
    SiT:   x_s = s * data + (1 - s) * noise,  s = 0 noise .. 1 data,  v_SiT = data - noise
    ours:  x_t = (1 - t) * data + t * noise,  t = 0 data .. 1 noise,  v = noise - data
so t = 1 - s and v = -v_SiT: our model must compute -SiT(x, 1 - t, y). Both maps are folded into
the weights, so the imported model is an ordinary flow model of ours (training, distillation and
guidance intervals need nothing special):
  - the velocity sign: the velocity rows of `final_layer.linear` are negated (exact);
  - the time flip: the sinusoidal features obey phi(1 - t) = R phi(t) with R a fixed block rotation
    ([cos f, sin f; sin f, -cos f] per frequency f), so the first time-MLP weight W becomes W R
    (exact in real arithmetic; float32 rounding of about 1e-7 relative);
  - SiT's learned-sigma half of the output, which its forward drops, is removed from the final layer.

A GSPN model starts from an imported (or trained) DiT through distillation: gspn_gen.distill.convert_to_gspn.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import sys

import torch

from gspn_gen.checkpoints import CheckpointError, SafeCheckpointIO, init_args, why_unreadable
from gspn_gen.checkpoints.build import module_kwargs
from gspn_gen.codecs import CodecLoadError, check_vae_source, sd_vae_spec
from gspn_gen.diffusion import FlowMatching, GaussianDiffusion, describe
from gspn_gen.fileio import OutputError, check_output
from gspn_gen.lit import GenerationModule
from gspn_gen.models.zoo import MODELS

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"

# Every key of an official DiT/SiT state dict (timm's Attention and Mlp hold no other tensors).
_TOP_KEYS = {
    "pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias",
    "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias",
    "y_embedder.embedding_table.weight",
    "final_layer.linear.weight", "final_layer.linear.bias",
    "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias",
}
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2|adaLN_modulation\.1)\.(weight|bias)")

# The official sampling protocol of each family, the imported checkpoint's default.
_FAMILIES = {
    "dit": (GaussianDiffusion, {"sampler": "ddpm", "sampling_steps": 250}),
    "sit": (FlowMatching, {"sampler": "sde", "sampling_steps": 250}),
}


def read_official(path: str) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The state dict of an official DiT/SiT checkpoint file (its "ema" entry for a train.py file), and the
    training arguments stored beside it as a plain dict ("args"), if any."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        if not isinstance(e, pickle.UnpicklingError):  # truncated, empty, not a torch file
            raise CheckpointError(f"cannot import {path!r}: it {why_unreadable(path, e)}") from None
        raise CheckpointError(
            f"cannot read {path!r} with weights_only=True: it holds pickled Python objects; a DiT/SiT train.py "
            "checkpoint also pickles its argparse arguments: on a machine you trust, re-save its 'ema' entry "
            "alone as a plain state dict and import that file"
        ) from None
    args = None
    if isinstance(obj, dict) and isinstance(obj.get("ema"), dict):
        args = obj.get("args") if isinstance(obj.get("args"), dict) else None
        obj = obj["ema"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path!r} is not a DiT/SiT state dict (expected a dict of tensors)")
    return obj, args


def label_classes(rows: int, num_classes: int | None, args: dict | None) -> tuple[int, bool]:
    """(classes, has a null row) of a label table with `rows` rows.

    A model trained with label dropout has one row more than classes, the last being the null class of
    guidance; one trained without has none. Decided by `num_classes` (--num-classes), else by the
    training args stored in the file, else for the official ImageNet files (1001 rows: 1000 classes and
    the null class); otherwise the caller must say, and CheckpointError asks for --num-classes.
    """
    source = "--num-classes"
    if num_classes is None and args is not None and isinstance(args.get("num_classes"), int):
        num_classes, source = args["num_classes"], "the file's training args (num_classes)"
    if num_classes is None:
        if rows == 1001:
            return 1000, True
        raise CheckpointError(
            f"the label table has {rows} rows: {rows - 1} classes and the null class of guidance, or {rows} "
            f"classes of a model trained without label dropout; say which with --num-classes {rows - 1} or "
            f"--num-classes {rows}")
    if rows == num_classes + 1:
        return num_classes, True
    if rows == num_classes:
        return num_classes, False
    raise CheckpointError(f"{source} says {num_classes} classes, but the label table has {rows} rows "
                          f"(expected {num_classes + 1} with a null class or {num_classes} without)")


def check_layout(state: dict[str, torch.Tensor]) -> int:
    """The block count of an official DiT/SiT state dict; any other layout raises CheckpointError."""
    blocks: set[int] = set()
    for key in state:
        match = _BLOCK_KEY.fullmatch(key)
        if match:
            blocks.add(int(match.group(1)))
        elif key not in _TOP_KEYS:
            raise CheckpointError(f"not an official DiT/SiT layout: unexpected key {key!r}")
    depth = max(blocks) + 1 if blocks else 0
    expected = sorted(_TOP_KEYS) + [
        f"blocks.{i}.{name}.{kind}" for i in range(depth)
        for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1") for kind in ("weight", "bias")
    ]
    missing = [k for k in expected if k not in state]
    if missing or not depth:
        raise CheckpointError(f"not an official DiT/SiT layout: missing key {(missing or ['blocks.0.*'])[0]!r}")
    return depth


def infer_config(state: dict[str, torch.Tensor], family: str, num_classes: int | None = None,
                 args: dict | None = None) -> dict:
    """GenerationModule arguments (preset, overrides, process, data shape) read from the tensor shapes;
    the class count as `label_classes` decides it. A model without a null row gets class_dropout_prob 0,
    which is how sampling knows it cannot be guided."""
    depth = check_layout(state)
    width, in_channels, patch, _ = state["x_embedder.proj.weight"].shape
    out_channels = state["final_layer.linear.weight"].shape[0] // (patch * patch)
    if out_channels not in (in_channels, 2 * in_channels):
        raise CheckpointError(f"final layer gives {out_channels} channels for {in_channels} input channels")
    tokens = state["pos_embed"].shape[1]
    side = round(tokens ** 0.5)
    if side * side != tokens:
        raise CheckpointError(f"pos_embed has {tokens} tokens, not a square grid")
    candidates = [name for name, args in MODELS.items()
                  if args["mixer"] == "attention" and args["hidden_size"] == width and args["patch_size"] == patch]
    if not candidates:
        raise CheckpointError(f"no DiT preset of width {width} and patch size {patch} (see python -m gspn_gen.models.zoo)")
    name = next((n for n in candidates if MODELS[n]["depth"] == depth), candidates[0])
    classes, has_null = label_classes(state["y_embedder.embedding_table.weight"].shape[0], num_classes, args)
    shape = {"depth": depth, "mlp_ratio": state["blocks.0.mlp.fc1.weight"].shape[0] / width}
    if not has_null:
        shape["class_dropout_prob"] = 0.0
    learn_sigma = out_channels == 2 * in_channels
    if family == "sit":
        learn_sigma = False  # SiT's forward drops the sigma half; import removes it from the weights
    process, process_args = _FAMILIES[family]
    if family == "dit":
        process_args = {**process_args, "learn_sigma": learn_sigma}
    return {
        "model": name,
        "model_args": {k: v for k, v in shape.items() if MODELS[name][k] != v},
        "diffusion": describe(process(**process_args)),
        "num_classes": classes,
        "in_channels": in_channels,
        "input_size": side * patch,
    }


def sit_to_ours(state: dict[str, torch.Tensor], frequencies: torch.Tensor) -> dict[str, torch.Tensor]:
    """Fold SiT's time and velocity conventions into its weights (module docstring).

    `frequencies` are the time features at t = 1, [cos f, sin f] (the embedder's own `frequencies`).
    """
    state = dict(state)
    in_channels, patch = state["x_embedder.proj.weight"].shape[1], state["x_embedder.proj.weight"].shape[2]
    rows = state["final_layer.linear.weight"].shape[0]
    out_channels = rows // (patch * patch)
    keep = torch.arange(rows) % out_channels < in_channels   # unpatchify order: (p, p, C_out), C_out fastest
    for kind in ("weight", "bias"):
        state[f"final_layer.linear.{kind}"] = -state[f"final_layer.linear.{kind}"][keep]
    half = frequencies.shape[-1] // 2
    cos, sin = frequencies[:half].double(), frequencies[half:2 * half].double()
    w = state["t_embedder.mlp.0.weight"].double()              # (D, F): columns [cos features, sin features]
    w_cos, w_sin = w[:, :half], w[:, half:2 * half]
    folded = w.clone()
    folded[:, :half] = w_cos * cos + w_sin * sin                # phi_cos(1 - t) = cos f cos ft + sin f sin ft
    folded[:, half:2 * half] = w_cos * sin - w_sin * cos        # phi_sin(1 - t) = sin f cos ft - cos f sin ft
    state["t_embedder.mlp.0.weight"] = folded.to(state["t_embedder.mlp.0.weight"].dtype)
    return state


def official_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename `blocks.N.attn.*` to our `blocks.N.mixer.*`; every other key already matches."""
    return {re.sub(r"^(blocks\.\d+)\.attn\.", r"\1.mixer.", k): v for k, v in state.items()}


def import_official(src: str, out: str, family: str, vae: str = DEFAULT_VAE, num_classes: int | None = None) -> dict:
    """Write `out`, a checkpoint of ours, from the official DiT (family "dit") or SiT ("sit") file `src`.

    Returns the checkpoint's hyper-parameters. The layout is checked against a meta-device model of
    the inferred preset, so a wrong shape is refused before anything is written. `num_classes`: see
    `label_classes`; a table without a null row gets a zero row there (never used: such a model is
    sampled unguided only).
    """
    if family not in _FAMILIES:
        raise ValueError(f"family must be one of {sorted(_FAMILIES)}, got {family!r}")
    state, args = read_official(src)
    hparams = {**infer_config(state, family, num_classes, args), "codec": sd_vae_spec(vae), "class_names": None}
    table = state["y_embedder.embedding_table.weight"]
    if table.shape[0] == hparams["num_classes"]:  # no null row: keep the layout of ours
        state = {**state, "y_embedder.embedding_table.weight": torch.cat([table, table.new_zeros(1, table.shape[1])])}
    with torch.device("meta"):  # shapes only: nothing is allocated
        module = GenerationModule(**module_kwargs(hparams))
    hparams, net = init_args(dict(module.hparams)), module.model
    if family == "sit":
        state = sit_to_ours(state, net.t_embedder.frequencies(torch.ones(1)).squeeze(0))
    state = official_to_ours(state)
    expected = {k: v.shape for k, v in net.state_dict().items()}
    for key, shape in expected.items():
        if key not in state or state[key].shape != shape:
            got = tuple(state[key].shape) if key in state else "nothing"
            raise CheckpointError(f"{src!r}: {key} should have shape {tuple(shape)} for {hparams['model']}, got {got}")
    state = {k: v.float().contiguous() for k, v in state.items()}
    both = {**{f"model.{k}": v for k, v in state.items()}, **{f"ema.{k}": v for k, v in state.items()}}
    ckpt = {"state_dict": both, "hyper_parameters": hparams,
            "imported_from": {"file": os.path.basename(src), "family": family}}
    SafeCheckpointIO().save_checkpoint(ckpt, out)  # crash-safe, like every checkpoint we write
    return hparams


# ------------------------------------------------------------------------------------ command line

def main(argv: list[str] | None = None) -> None:
    """`python -m gspn_gen.checkpoints import-dit|import-sit SRC --out DST [--vae ID_OR_DIR]`."""
    parser = argparse.ArgumentParser(
        prog="python -m gspn_gen.checkpoints",
        description="Import an official DiT or SiT checkpoint as a gspn-gen checkpoint (for sample.py, fid_eval, "
                    "and as a distillation teacher).",
        epilog="examples:\n"
               "  python -m gspn_gen.checkpoints import-dit DiT-XL-2-256x256.pt --out dit-xl2-256.ckpt\n"
               "  python -m gspn_gen.checkpoints import-sit SiT-XL-2-256x256.pt --out sit-xl2-256.ckpt "
               "--vae /models/sd-vae-ft-ema\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for family in ("dit", "sit"):
        p = sub.add_parser(f"import-{family}", help=f"official {family.upper()} state dict -> our checkpoint")
        p.add_argument("src", help=f"the official file, e.g. {family.upper()}-XL-2-256x256.pt")
        p.add_argument("--out", required=True, help="the checkpoint to write (refused if it exists)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
        p.add_argument("--vae", default=DEFAULT_VAE, metavar="ID_OR_DIR",
                       help=f"the SD VAE that decodes samples: hub id or local directory (default {DEFAULT_VAE}; "
                            "an offline machine needs a local copy); sample.py --vae can change it later")
        p.add_argument("--num-classes", type=int, default=None, metavar="N",
                       help="classes of the model: the label table holds N + 1 rows when it was trained with "
                            "label dropout (the last is the null class of guidance), N without (then it is "
                            "sampled unguided only); needed unless the file's training args or the official "
                            "1001-row ImageNet table decide it")
    args = parser.parse_args(argv)
    family = args.command.split("-")[1]
    if args.num_classes is not None and args.num_classes < 1:
        _fail(f"--num-classes must be >= 1, got {args.num_classes}")
    try:
        check_output(args.out, args.overwrite)
        check_vae_source(args.vae)
    except OutputError as e:
        _fail(str(e))
    except CodecLoadError as e:
        _fail(f"--vae: {e}")
    try:
        hp = import_official(args.src, args.out, family, args.vae, args.num_classes)
    except CheckpointError as e:
        _fail(str(e))
    overrides = {k: v for k, v in hp["model_args"].items() if v is not None}
    guidance = ("" if overrides.get("class_dropout_prob") != 0 else
                " (trained without label dropout: no null class, sample it with --cfg-scale 1)")
    print(f"wrote {args.out}: {hp['model']}{' ' + str(overrides) if overrides else ''}, "
          f"{hp['diffusion']['class_path'].rsplit('.', 1)[-1]}, "
          f"{hp['num_classes']} classes{guidance}, {hp['in_channels']}x{hp['input_size']}x{hp['input_size']} "
          f"latents, VAE {hp['codec']['path']}")


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
