"""Memory model on the CPU: what one block keeps for backward and writes, GSPN-XL/2 vs GSPN-paper-XL/2 vs DiT-XL/2.

    python benchmarks/memory.py [--presets GSPN-XL/2 GSPN-paper-XL/2 DiT-XL/2] [--px 256 512] [--batch 2]
                                [--precision fp32 bf16] [--no-recompute-rows] [--json PATH] [--plot PATH]

Builds one block of each preset at its real width (a chunked layer and a global layer for GSPN; block 0
and the last block), runs its training forward and backward on the CPU at a small batch on the token
grid of `px` (SD-VAE latents, px / 8, patchified) and reports per image (bytes scale linearly with the
batch; parameter casts do not and are given per block): bytes kept for backward, split into mixer / MLP /
other (norms, adaLN, residual gates, long skips), bytes the forward writes, and GFLOPs of forward and of
forward + backward (gspn_gen.models.memory says how each is counted). "bf16" runs under CPU autocast,
as training on a GPU runs under CUDA autocast. Ratios are against DiT-XL/2's block at the same px and
precision. By default each GSPN preset also gets a row with the mixer's recomputation off, the layout
before it. Writes JSON (default benchmarks/results/memory-<cpu>-<date>.json) and a bar plot beside it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import resource
import sys
import time
from pathlib import Path

import torch

from gspn_gen.fileio import atomic_write, write_json
from gspn_gen.models.memory import PARTS, block_inputs, measure_block
from gspn_gen.models.zoo import MODELS, build_model
from gspn_gen.report import cpu_name, slug

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_PRESETS = ["GSPN-XL/2", "GSPN-paper-XL/2", "DiT-XL/2"]
REFERENCE = "DiT-XL/2"
LATENT_FACTOR = 8  # SD-VAE: px per latent pixel
MIB = 2**20


def build_block(name: str, index: int, overrides: dict):
    """Block `index` of preset `name` at its real width on the CPU (random weights), and the model's facts."""
    with torch.device("meta"):
        model = build_model(name, **overrides)
    block = model.blocks[index].to_empty(device="cpu")
    gen = torch.Generator().manual_seed(index)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    return block.train(), model


def layers(name: str, depth: int) -> list[tuple[str, int]]:
    """(layer kind, block index) rows for a preset: GSPN's first (chunked) and last (global) block."""
    if MODELS[name]["mixer"] != "gspn":
        return [("attention", 0)]
    chunk = MODELS[name].get("chunk", 2)
    return [(f"chunk {chunk}", 0), ("global", depth - 1)]


def measure(name: str, overrides: dict, px: int, batch: int, precision: str) -> list[dict]:
    rows = []
    depth = MODELS[name]["depth"]
    for kind, index in layers(name, depth):
        block, model = build_block(name, index, overrides)
        grid = (px // LATENT_FACTOR // model.patch_size,) * 2
        width = block.norm1.normalized_shape[0]
        x, c, skip = block_inputs(block, batch, grid, width)
        dtype = torch.bfloat16 if precision == "bf16" else None
        t0 = time.perf_counter()
        m = measure_block(block, x, c, grid, skip, autocast_dtype=dtype)
        rows.append({
            "model": name, "recompute": bool(getattr(block.mixer, "recompute", False)), "layer": kind,
            "block_index": index, "px": px, "grid": list(grid), "width": width, "batch": batch,
            "precision": precision,
            "saved_mib_per_image": {p: m.saved[p] / MIB / batch for p in PARTS},
            "saved_block_mib_per_image": m.saved_total / MIB / batch,
            "weight_casts_mib": m.weight_casts / MIB,
            "written_mib_per_image": {p: m.written[p] / MIB / batch for p in PARTS},
            "written_block_mib_per_image": sum(m.written.values()) / MIB / batch,
            "gflops_forward_per_image": m.flops_forward / 1e9 / batch,
            "gflops_train_per_image": (m.flops_forward + m.flops_backward) / 1e9 / batch,
            "seconds": time.perf_counter() - t0,
        })
        print(f"  {label(rows[-1])} {kind} {px} px "
              f"{precision}: block {rows[-1]['saved_block_mib_per_image']:.1f} MiB/img saved "
              f"({rows[-1]['seconds']:.1f} s)", flush=True)
        del block, model, x, c, skip
    return rows


def label(row: dict) -> str:
    """The model, marked when it is a GSPN model with the mixer's recomputation off."""
    off = row["layer"] != "attention" and not row["recompute"]
    return row["model"] + (" (no recompute)" if off else "")


def add_ratios(rows: list[dict]) -> None:
    """Mixer and block saved bytes relative to the reference (DiT-XL/2) at the same px and precision."""
    ref = {(r["px"], r["precision"]): r for r in rows if r["model"] == REFERENCE}
    for r in rows:
        base = ref.get((r["px"], r["precision"]))
        if base is not None:
            r["mixer_vs_dit"] = r["saved_mib_per_image"]["mixer"] / base["saved_mib_per_image"]["mixer"]
            r["block_vs_dit"] = r["saved_block_mib_per_image"] / base["saved_block_mib_per_image"]


def print_table(rows: list[dict]) -> None:
    print(f"\n{'model':<28} {'layer':<9} {'px':>4} {'prec':<4} | saved MiB/img: {'mixer':>7} {'mlp':>7} "
          f"{'other':>7} {'block':>7} | vs DiT: {'mixer':>5} {'block':>5} | written {'MiB/img':>7} | "
          f"GFLOPs/img fwd {'train':>6}")
    for r in rows:
        s = r["saved_mib_per_image"]
        ratio = (f"{r['mixer_vs_dit']:>5.2f} {r['block_vs_dit']:>5.2f}" if "mixer_vs_dit" in r else f"{'-':>5} {'-':>5}")
        print(f"{label(r):<28} {r['layer']:<9} {r['px']:>4} {r['precision']:<4} | {'':>14} {s['mixer']:>7.2f} "
              f"{s['mlp']:>7.2f} {s['other']:>7.2f} {r['saved_block_mib_per_image']:>7.2f} | {'':>7} {ratio} | "
              f"{'':>7} {r['written_block_mib_per_image']:>7.1f} | {r['gflops_forward_per_image']:>14.2f} "
              f"{r['gflops_train_per_image']:>6.2f}")


def plot(rows: list[dict], path: Path) -> bool:
    """Stacked bars of saved MiB per image per block (mixer / MLP / other); False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    precisions = sorted({r["precision"] for r in rows})
    fig, axes = plt.subplots(1, len(precisions), figsize=(7 * len(precisions), 5), squeeze=False)
    colors = {"mixer": "tab:blue", "mlp": "tab:orange", "other": "tab:gray"}
    for ax, precision in zip(axes[0], precisions):
        sel = [r for r in rows if r["precision"] == precision]
        labels = [f"{label(r)}\n{r['layer']} {r['px']}px" for r in sel]
        bottom = [0.0] * len(sel)
        for part in PARTS:
            values = [r["saved_mib_per_image"][part] for r in sel]
            ax.bar(range(len(sel)), values, bottom=bottom, label=part, color=colors[part])
            bottom = [b + v for b, v in zip(bottom, values)]
        ax.set_xticks(range(len(sel)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("MiB kept for backward per image, one block")
        ax.set_title(f"{precision}, CPU memory model")
        ax.legend()
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python benchmarks/memory.py", description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=DEFAULT_PRESETS, help="model presets (DiT-XL/2 is the reference)")
    parser.add_argument("--px", nargs="+", type=int, default=[256, 512], help="image sides in px (latents px / 8)")
    parser.add_argument("--batch", type=int, default=2, help="images per measured forward (results are per image)")
    parser.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--no-recompute-rows", action="store_true",
                        help="skip the extra rows of the GSPN presets with the mixer's recomputation off")
    parser.add_argument("--json", type=Path, help="output JSON (default benchmarks/results/memory-<cpu>-<date>.json)")
    parser.add_argument("--plot", type=Path, help="output PNG (default: beside the JSON)")
    args = parser.parse_args(argv)
    unknown = [n for n in args.presets if n not in MODELS]
    if unknown:
        parser.error(f"unknown preset(s) {unknown}; known: {', '.join(MODELS)}")
    bad = [px for px in args.px if px < 16 or px % 16]
    if bad or args.batch < 1:
        parser.error(f"px must be multiples of 16 (latents px / 8, patch 2) and batch >= 1, got {bad or args.batch}")

    variants = []
    for name in args.presets:
        variants.append((name, {}))
        if MODELS[name]["mixer"] == "gspn" and MODELS[name].get("recompute") and not args.no_recompute_rows:
            variants.append((name, {"recompute": False}))
    date = _dt.date.today().isoformat()
    cpu = cpu_name()
    path = args.json or RESULTS / f"memory-{slug(cpu)}-{date}.json"
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    rows = []
    for precision in args.precision:
        for px in args.px:
            for name, overrides in variants:
                rows += measure(name, overrides, px, args.batch, precision)
    add_ratios(rows)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    result = {
        "benchmark": "benchmarks/memory.py", "device": cpu, "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(), "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "cpu_seconds": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
        "measured": ("one block, training forward then backward, CPU; saved = bytes autograd keeps for backward "
                     "(saved_tensors_hooks + autograd.Function context attributes, one count per storage, "
                     "parameters and their casts excluded), per image; written = bytes of new storages the "
                     "forward's ops return, per image; GFLOPs: FlopCounterMode (multiply-add = 2) plus the "
                     "GSPN scan formula; train = forward + backward including recomputation"),
        "rows": rows,
    }
    write_json(path, result)
    print_table(rows)
    print(f"wrote {path}")
    png = args.plot or path.with_suffix(".png")
    if plot(rows, png):
        print(f"wrote {png}")
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
