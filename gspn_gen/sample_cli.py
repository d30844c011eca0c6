"""`python sample.py`: class grids and large sample batches from a training checkpoint.

Everything (preset, diffusion, codec, class names) is rebuilt from the checkpoint; EMA weights by default.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from gspn_gen.checkpoints import CheckpointError, load_module
from gspn_gen.codecs import CodecLoadError
from gspn_gen.fileio import write_json
from gspn_gen.lit import GenerationModule
from gspn_gen.sampling import class_grid, generate, save_image, save_npz

EPILOG = """examples:
  python sample.py --ckpt runs/demo/checkpoints/last.ckpt --classes 0 1 2 3 --per-class 8 --out grid.png
  python sample.py --ckpt runs/x/checkpoints/last.ckpt --classes 207 360 387 974 --cfg-scale 4 --out grid.png
  python sample.py --ckpt runs/x/checkpoints/last.ckpt --num-samples 50000 --cfg-scale 1.5 --out samples.npz

Sample i always uses the noise of (seed, i), so results do not depend on --batch-size or --devices.
Multi-GPU: python sample.py --ckpt ... --num-samples 50000 --devices 8 --out samples.npz
For FID, DiT and SiT report cfg-scale 1.5 (and 1.0 for unguided); grids usually look best at 4.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sample.py", description=__doc__.splitlines()[0].split(": ", 1)[1],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="Lightning checkpoint written by train_gen.py (e.g. runs/demo/checkpoints/last.ckpt)")
    p.add_argument("--out", required=True,
                   help="output: a .png/.jpg writes a labelled class grid, a .npz an ADM-style batch "
                        "(arr_0 uint8 NHWC, arr_1 int64 labels)")
    p.add_argument("--classes", type=int, nargs="+", default=None,
                   help="class ids for the grid, one row each (default: all classes, at most 16)")
    p.add_argument("--per-class", type=int, default=8, help="grid: images per class row (default 8)")
    p.add_argument("--num-samples", type=int, default=None,
                   help=".npz: number of samples, classes balanced (sample i has class i mod num_classes)")
    p.add_argument("--cfg-scale", type=float, default=4.0,
                   help="classifier-free guidance scale on all channels; 1 disables guidance (default 4.0)")
    p.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="guide only where t / T lies in [LO, HI] (default: everywhere)")
    p.add_argument("--guide-channels", type=int, default=None, metavar="K",
                   help="guide only the first K latent channels (default: all); official DiT/SiT sampling "
                        "guides 3 of the SD VAE's 4, so --guide-channels 3 reproduces their published numbers")
    p.add_argument("--sampler", default=None,
                   help="gaussian: ddim (default) or ddpm; flow: heun (default), euler or sde")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: the process's own: gaussian 50 DDIM steps, flow 25 Heun steps)")
    p.add_argument("--seed", type=int, default=0, help="global seed; sample i's noise depends only on (seed, i)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per forward pass (default 64)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when available)")
    p.add_argument("--no-ema", action="store_true", help="use the raw training weights instead of the EMA")
    p.add_argument("--vae", default=None, metavar="ID_OR_DIR",
                   help="load the checkpoint's VAE from here instead (e.g. a local copy on an offline machine)")
    p.add_argument("--shard-size", type=int, default=1000,
                   help=".npz: samples per resumable shard in OUT.parts/ (default 1000); a crashed run resumes "
                        "with the same command, skipping finished shards")
    p.add_argument("--devices", type=int, default=1,
                   help=".npz: processes/GPUs on this node (Lightning Fabric, DDP); shards are split across ranks")
    p.add_argument("--num-nodes", type=int, default=1, help=".npz: number of nodes (SLURM/torchrun launch)")
    p.add_argument("--accelerator", default="auto", help=".npz with --devices: cpu, gpu or auto")
    return p.parse_args(argv)


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def load(args, device) -> GenerationModule:
    try:
        module = load_module(args.ckpt, device)
    except CheckpointError as e:
        fail(str(e))
    if args.vae:
        codec = module.hparams.codec or {}
        if codec.get("name") != "sd-vae":
            fail(f"--vae given, but this checkpoint's codec is {codec.get('name', 'identity')!r}, not a VAE")
        module.hparams.codec = {**codec, "path": args.vae}
    return module


def sample_range(module, labels: torch.Tensor, start: int, stop: int, args, progress: bool) -> np.ndarray:
    """Samples start..stop-1 (global ids, so seeds do not depend on batching) in --batch-size chunks."""
    kw = {"seed": args.seed, "cfg_scale": args.cfg_scale, "steps": args.steps, "sampler": args.sampler,
          "guidance_interval": tuple(args.guidance_interval) if args.guidance_interval else None,
          "guide_channels": args.guide_channels,
          "use_ema": not args.no_ema}
    chunks = []
    starts = range(start, stop, args.batch_size)
    for s in tqdm(starts, desc="sampling", unit="batch", file=sys.stderr, disable=not progress):
        e = min(s + args.batch_size, stop)
        try:
            chunks.append(generate(module, labels[s:e], indices=range(s, e), **kw))
        except (ValueError, CodecLoadError) as err:  # an unknown sampler name, a VAE that cannot load
            fail(str(err))
    return np.concatenate(chunks)


def write_grid(args) -> None:
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    module = load(args, device)
    num_classes = module.hparams.num_classes
    classes = args.classes if args.classes is not None else list(range(min(num_classes, 16)))
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        fail(f"class id(s) {bad} out of range: this checkpoint has classes 0..{num_classes - 1}")
    labels = torch.tensor(classes).repeat_interleave(args.per_class)
    images = sample_range(module, labels, 0, len(labels), args, progress=True)
    save_image(class_grid(images, labels.tolist(), args.per_class, module.hparams.class_names), args.out)
    print(f"wrote {args.out} ({len(classes)} classes x {args.per_class}, cfg {args.cfg_scale})")


def write_npz(args) -> None:
    """Shards of --shard-size samples, shard k on rank k mod world size; rank 0 assembles one .npz."""
    from lightning.fabric import Fabric

    world = args.devices * args.num_nodes
    fabric = Fabric(accelerator=args.accelerator, devices=args.devices, num_nodes=args.num_nodes,
                    strategy="ddp" if world > 1 else "auto")
    fabric.launch()
    module = load(args, fabric.device)
    labels = torch.arange(args.num_samples) % module.hparams.num_classes
    parts = Path(f"{args.out}.parts")
    settings = {k: getattr(args, k) for k in ("seed", "cfg_scale", "guidance_interval", "guide_channels", "sampler",
                                              "steps", "no_ema", "num_samples", "shard_size")}
    settings["ckpt"] = os.path.abspath(args.ckpt)
    if fabric.global_rank == 0:
        write_manifest(parts, settings)
    fabric.barrier()
    check_manifest(parts, settings)  # on every rank, so a mismatch stops all of them
    shards = range(-(-args.num_samples // args.shard_size))
    mine = [k for k in shards if k % fabric.world_size == fabric.global_rank]
    todo = [k for k in mine if not (parts / f"shard-{k:05d}.npz").exists()]
    if fabric.global_rank == 0 and len(todo) < len(mine):
        print(f"resuming: {len(mine) - len(todo)} of rank 0's {len(mine)} shards already done", file=sys.stderr)
    for k in tqdm(todo, desc=f"shards (rank {fabric.global_rank})", unit="shard", file=sys.stderr,
                  disable=fabric.global_rank != 0):
        start, stop = k * args.shard_size, min((k + 1) * args.shard_size, args.num_samples)
        images = sample_range(module, labels, start, stop, args, progress=False)
        save_npz(images, labels[start:stop].numpy(), str(parts / f"shard-{k:05d}.npz"))
    fabric.barrier()
    if fabric.global_rank == 0:
        images = None  # filled shard by shard: rank 0 holds one copy of the batch, not two
        for k in shards:
            with np.load(parts / f"shard-{k:05d}.npz") as shard:
                block = shard["arr_0"]
                if images is None:
                    images = np.empty((args.num_samples, *block.shape[1:]), dtype=block.dtype)
                images[k * args.shard_size: k * args.shard_size + len(block)] = block
        save_npz(images, labels.numpy(), args.out)
        shutil.rmtree(parts)
        print(f"wrote {args.out} ({args.num_samples} samples, classes balanced, cfg {args.cfg_scale})")


def write_manifest(parts: Path, settings: dict) -> None:
    """Record the sampling settings beside the shards (temp name, then rename), unless already there."""
    if not (parts / "settings.json").exists():
        write_json(parts / "settings.json", settings)


def check_manifest(parts: Path, settings: dict) -> None:
    """Refuse to resume shards that were drawn with other settings."""
    old = json.loads((parts / "settings.json").read_text())
    if old != settings:
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        fail(f"{parts} holds shards drawn with other settings {diff}; delete it or rerun with the same ones")


def run(args: argparse.Namespace) -> None:
    out = args.out
    is_npz = out.endswith(".npz")
    if not is_npz and not out.lower().endswith((".png", ".jpg", ".jpeg")):
        fail(f"--out {out!r}: expected a .png/.jpg (grid) or .npz (sample batch) path")
    if is_npz and not args.num_samples:
        fail("--out *.npz needs --num-samples N")
    for name in ("num_samples", "per_class", "batch_size", "shard_size", "devices", "num_nodes", "guide_channels"):
        value = getattr(args, name)
        if value is not None and value < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    (write_npz if is_npz else write_grid)(args)


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
