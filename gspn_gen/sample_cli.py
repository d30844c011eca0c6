"""`python sample.py`: class grids and large sample batches from a training checkpoint.

Everything (preset, diffusion, codec, class names) is rebuilt from the checkpoint; EMA weights by default.
Before the first sample is drawn the request is checked as a whole: the output (exists: refused without
--overwrite, unless it is the resumable continuation of the same settings; writable), one writer per
output (a lock beside it), the sampler, step count and guidance the checkpoint allows, the codec (VAE)
and the network on this device, and the disk space and memory the result needs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import sys
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from tqdm import tqdm

from gspn_gen.checkpoints import CheckpointError, fingerprint, load_module, nonfinite_tensors
from gspn_gen.codecs import CodecLoadError, check_vae_source
from gspn_gen.fileio import (
    OutputError,
    available_memory,
    check_output,
    format_bytes,
    free_bytes,
    remove_stale_temps,
    write_json,
)
from gspn_gen.lit import GenerationModule
from gspn_gen.runlock import LockHeld, RunLock, output_lock
from gspn_gen.sampling import (
    IMAGE_FORMATS,
    NonFiniteSamplesWarning,
    check_sampling,
    class_grid,
    generate,
    grid_bytes,
    image_bytes,
    preflight,
    save_image,
    save_npz,
)
from gspn_gen.stopping import Interrupted, exit_on_signals

MAX_CFG_SCALE = 100.0

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
                   help="output: a .png/.jpg/.jpeg writes a labelled class grid in that format, a .npz an ADM-style "
                        "batch (arr_0 uint8 NHWC, arr_1 int64 labels); extensions in any case")
    p.add_argument("--classes", type=int, nargs="+", default=None,
                   help="class ids for the grid, one row each (default: all classes, at most 16)")
    p.add_argument("--per-class", type=int, default=8, help="grid: images per class row (default 8)")
    p.add_argument("--num-samples", type=int, default=None,
                   help=".npz: number of samples, classes balanced (sample i has class i mod num_classes)")
    p.add_argument("--cfg-scale", type=float, default=4.0,
                   help=f"classifier-free guidance scale, 0 to {MAX_CFG_SCALE:g}; 1 disables guidance, "
                        "0 samples unconditionally (default 4.0)")
    p.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="guide only where t / T lies in [LO, HI], 0 <= LO <= HI <= 1 (default: everywhere)")
    p.add_argument("--guide-channels", type=int, default=None, metavar="K",
                   help="guide only the first K latent channels (default: all); official DiT/SiT sampling "
                        "guides 3 of the SD VAE's 4, so --guide-channels 3 reproduces their published numbers")
    p.add_argument("--sampler", default=None,
                   help="gaussian: ddim (default) or ddpm; flow: heun (default), euler or sde")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: the process's own: gaussian 50 DDIM steps, flow 25 Heun steps)")
    p.add_argument("--seed", type=int, default=0, help="global seed; sample i's noise depends only on (seed, i)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per forward pass (default 64)")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:N or auto (default: cuda when available); .npz runs with one device too")
    p.add_argument("--no-ema", action="store_true", help="use the raw training weights instead of the EMA")
    p.add_argument("--vae", default=None, metavar="ID_OR_DIR",
                   help="load the checkpoint's VAE from here instead (e.g. a local copy on an offline machine)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out (and discard OUT.parts/ shards drawn with other settings); "
                        "without it an existing output is refused, except a .npz run resuming its own shards")
    p.add_argument("--shard-size", type=int, default=1000,
                   help=".npz: samples per resumable shard in OUT.parts/ (default 1000); a crashed run resumes "
                        "with the same command, skipping finished shards; a replaced checkpoint or other settings "
                        "are refused")
    p.add_argument("--devices", type=int, default=1,
                   help=".npz: processes/GPUs on this node (Lightning Fabric, DDP); shards are split across ranks")
    p.add_argument("--num-nodes", type=int, default=1, help=".npz: number of nodes (SLURM/torchrun launch)")
    p.add_argument("--accelerator", default="auto", help=".npz with --devices: cpu, gpu or auto")
    return p.parse_args(argv)


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def resolve_device(spec: str) -> torch.device:
    """--device as a torch.device that exists on this machine; anything else is one error line."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        fail(f"--device {spec!r}: expected cpu, cuda, cuda:N or auto")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            fail(f"--device {spec!r}: no CUDA GPU is available on this machine (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            fail(f"--device {spec!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def load(args, device, announce: bool = True) -> GenerationModule:
    try:
        module = load_module(args.ckpt, device)
    except CheckpointError as e:
        fail(str(e))
    if args.vae:
        codec = module.hparams.codec or {}
        if codec.get("name") != "sd-vae":
            fail(f"--vae given, but this checkpoint's codec is {codec.get('name', 'identity')!r}, not a VAE")
        module.hparams.codec = {**codec, "path": args.vae}
    try:
        check_sampling(module, args.sampler, args.steps, args.cfg_scale, args.guide_channels)
    except ValueError as e:
        fail(str(e))
    prefix = "model." if args.no_ema else "ema."
    bad = nonfinite_tensors(module.state_dict(), prefix)
    if bad and announce:
        warn(f"checkpoint {args.ckpt!r} holds NaN/inf in {len(bad)} weight tensors of its "
             f"{'raw' if args.no_ema else 'EMA'} model (e.g. {bad[0]}): its samples will be black")
    return module


def sample_range(module, labels: torch.Tensor, start: int, stop: int, args, bar=None) -> np.ndarray:
    """Samples start..stop-1 (global ids, so seeds do not depend on batching) in --batch-size chunks."""
    kw = {"seed": args.seed, "cfg_scale": args.cfg_scale, "steps": args.steps, "sampler": args.sampler,
          "guidance_interval": tuple(args.guidance_interval) if args.guidance_interval else None,
          "guide_channels": args.guide_channels,
          "use_ema": not args.no_ema}
    chunks = []
    for s in range(start, stop, args.batch_size):
        e = min(s + args.batch_size, stop)
        try:
            chunks.append(generate(module, labels[s:e], indices=range(s, e), **kw))
        except (ValueError, CodecLoadError) as err:  # a VAE that cannot load, a bad process setting
            fail(str(err))
        if bar is not None:
            bar.update(e - s)
    return np.concatenate(chunks)


@contextmanager
def nonfinite_report(total: int):
    """Count the samples that came out NaN/inf inside the block and say so once, on one line."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NonFiniteSamplesWarning)
        yield
    bad = 0
    for w in caught:
        if isinstance(w.message, NonFiniteSamplesWarning):
            bad += w.message.count
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if bad:
        warn(f"{bad} of {total} samples hold NaN/inf values and are written as black pixels "
             "(are the checkpoint's weights finite?)")


def progress(total: int, desc: str, enabled: bool = True) -> tqdm:
    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=not enabled, dynamic_ncols=True)


@contextmanager
def output_locked(out: Path):
    """Hold OUT's lock for the block: one sample.py per output."""
    try:
        with RunLock(output_lock(out.absolute()), f"--out {str(out)!r}"):
            yield
    except LockHeld as e:
        fail(f"{e}: wait for that sampling run to end, or choose another --out")


def prepare(module, device, args) -> int:
    """Load the codec and try the network on `device`; returns the decoded image side (errors end the run)."""
    try:
        return preflight(module, device)
    except (ValueError, CodecLoadError, ImportError) as e:
        fail(f"checkpoint {args.ckpt!r}: {e}")


def room_problem(out: Path, disk: int, memory: int, what: str) -> str | None:
    """Why `disk` more bytes on OUT's filesystem and `memory` bytes in memory do not fit (None when they do)."""
    free = free_bytes(out.absolute().parent)
    if disk > free:
        return (f"{what} needs about {format_bytes(disk)} on disk, but {out.absolute().parent} has "
                f"{format_bytes(free)} free")
    available = available_memory()
    if available is not None and memory > available:
        return f"{what} needs about {format_bytes(memory)} of memory, but {format_bytes(available)} is available"
    return None


def write_grid(args) -> None:
    out = Path(args.out)
    try:
        check_output(out, args.overwrite)
    except OutputError as e:
        fail(str(e))
    with output_locked(out):
        device = resolve_device(args.device)
        module = load(args, device)
        num_classes = module.hparams.num_classes
        classes = args.classes if args.classes is not None else list(range(min(num_classes, 16)))
        bad = [c for c in classes if not 0 <= c < num_classes]
        if bad:
            fail(f"class id(s) {bad} out of range: this checkpoint has classes 0..{num_classes - 1}")
        side = prepare(module, device, args)
        n = len(classes) * args.per_class
        grid = grid_bytes(len(classes), args.per_class, side)
        problem = room_problem(out, grid, n * image_bytes(side) + 2 * grid,
                               f"a grid of {len(classes)} x {args.per_class} images of {side}x{side}")
        if problem:
            fail(f"{problem}; ask for fewer --classes or a smaller --per-class")
        draw_grid(module, classes, args)


def draw_grid(module, classes: list[int], args) -> None:
    labels = torch.tensor(classes).repeat_interleave(args.per_class)
    with nonfinite_report(len(labels)), progress(len(labels), "sampling") as bar:
        images = sample_range(module, labels, 0, len(labels), args, bar)
    remove_stale_temps(Path(args.out).absolute().parent, Path(args.out).name)
    save_image(class_grid(images, labels.tolist(), args.per_class, module.hparams.class_names), args.out)
    print(f"wrote {args.out} ({len(classes)} classes x {args.per_class}, cfg {args.cfg_scale})")


def write_npz(args) -> None:
    """Shards of --shard-size samples, shard k on rank k mod world size; rank 0 checks and assembles one .npz.

    The process that launches the others (rank 0) checks the output and holds its lock throughout.
    """
    out = Path(args.out)
    with contextlib.ExitStack() as stack:
        if rank_zero_only.rank == 0:  # before the other ranks exist
            parts = Path(f"{args.out}.parts")
            try:
                # a .npz with shards beside it is a run killed while assembling or cleaning up: it continues
                check_output(out, args.overwrite or (parts / "settings.json").exists())
            except OutputError as e:
                fail(str(e))
            stack.enter_context(output_locked(out))
        draw_npz(args)


def draw_npz(args) -> None:
    from lightning.fabric import Fabric
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    world = args.devices * args.num_nodes
    accelerator, devices = args.accelerator, args.devices
    if args.device != "auto" and accelerator == "auto" and world == 1:
        device = resolve_device(args.device)
        accelerator, devices = device.type, [device.index] if device.index is not None else 1
    try:
        fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=args.num_nodes,
                        strategy="ddp" if world > 1 else "auto")
    except (MisconfigurationException, ValueError, RuntimeError) as e:
        fail(f"--accelerator {args.accelerator} --devices {args.devices}: {(str(e).splitlines() or [''])[0]}")
    fabric.launch()
    rank0 = fabric.global_rank == 0
    module = load(args, fabric.device, announce=rank0)
    side = prepare(module, fabric.device, args)
    parts = Path(f"{args.out}.parts")
    settings = {k: getattr(args, k) for k in ("seed", "cfg_scale", "guidance_interval", "guide_channels", "sampler",
                                              "steps", "no_ema", "num_samples", "shard_size")}
    # what the checkpoint file holds, not where it is: a file replaced at the same path is another model
    settings["ckpt"] = fabric.broadcast(fingerprint(args.ckpt) if rank0 else None, src=0)
    settings = json.loads(json.dumps(settings))
    problem = None
    if rank0:
        if args.overwrite and manifest_differs(parts, settings):
            clear_parts(parts)  # shards of other settings: --overwrite discards them
        problem = npz_room_problem(args, parts, side)
    problem = fabric.broadcast(problem, src=0)
    if problem:
        fail(problem)
    labels = torch.arange(args.num_samples) % module.hparams.num_classes
    key = json.dumps(settings, sort_keys=True)
    shards = range(-(-args.num_samples // args.shard_size))
    bounds = {k: (k * args.shard_size, min((k + 1) * args.shard_size, args.num_samples)) for k in shards}
    if rank0:  # what a killed run left half-written
        remove_stale_temps(Path(args.out).absolute().parent, Path(args.out).name)
        remove_stale_temps(parts)
        write_manifest(parts, settings)
    fabric.barrier()
    check_manifest(parts, settings)  # on every rank, so a mismatch stops all of them
    todo = []
    for k in (k for k in shards if k % fabric.world_size == fabric.global_rank):
        path, (s, e) = shard_path(parts, k), bounds[k]
        problem = shard_problem(path, labels[s:e].numpy(), key) if path.exists() else "missing"
        if problem not in (None, "missing"):
            warn(f"{path} {problem}: drawing it again")
        if problem:
            todo.append(k)
    done = len([k for k in shards if k % fabric.world_size == fabric.global_rank]) - len(todo)
    if rank0 and done:
        print(f"resuming: {done} of rank 0's shards already done", file=sys.stderr)
    total = sum(bounds[k][1] - bounds[k][0] for k in todo)
    with nonfinite_report(total), progress(total, f"sampling (rank 0 of {fabric.world_size})" if world > 1
                                           else "sampling", enabled=rank0) as bar:
        for k in todo:
            s, e = bounds[k]
            images = sample_range(module, labels, s, e, args, bar)
            save_npz(images, labels[s:e].numpy(), str(shard_path(parts, k)), settings=np.array(key))
    fabric.barrier()
    if rank0:
        assemble(parts, args, labels.numpy(), bounds, key)
        print(f"wrote {args.out} ({args.num_samples} samples, classes balanced, cfg {args.cfg_scale})")


SHARD_NAME = re.compile(r"shard-\d{5,}\.npz")


def npz_room_problem(args, parts: Path, side: int) -> str | None:
    """Whether the shards still to draw plus the assembled .npz fit on disk, and the batch in memory."""
    size = image_bytes(side)
    drawn = len(list(parts.glob("shard-*.npz"))) if parts.is_dir() else 0
    todo = max(args.num_samples - drawn * args.shard_size, 0)
    problem = room_problem(Path(args.out), (todo + args.num_samples) * (size + 8), args.num_samples * size,
                           f"--num-samples {args.num_samples} at {side}x{side} ({format_bytes(size)} per sample, "
                           "as shards and then as the assembled .npz)")
    if problem is None:
        return None
    fits = min(free_bytes(Path(args.out).absolute().parent) // (2 * (size + 8)), (available_memory() or 2**62) // size)
    return f"{problem}: at most about {fits} samples fit"


def shard_path(parts: Path, k: int) -> Path:
    return parts / f"shard-{k:05d}.npz"


def _npy_header(zf: zipfile.ZipFile, name: str) -> tuple[tuple, np.dtype]:
    """(shape, dtype) of an array in an .npz, read from its header without loading the data."""
    with zf.open(f"{name}.npy") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    return shape, dtype


def shard_problem(path: Path, labels: np.ndarray, key: str) -> str | None:
    """Why the shard at `path` cannot be used (None when it can): unreadable, other settings, count, labels."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if "settings" not in z.files or str(z["settings"][()]) != key:
                return "was drawn with other settings or another checkpoint"
            got = z["arr_1"]
            shape, dtype = _npy_header(z.zip, "arr_0")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        return f"is unreadable ({type(e).__name__})"
    if len(shape) != 4 or shape[0] != len(labels) or shape[3] != 3 or dtype != np.uint8:
        return f"holds images of shape {shape} {dtype}, expected ({len(labels)}, H, W, 3) uint8"
    if got.shape != labels.shape or not np.array_equal(got, labels):
        return f"holds {len(got)} labels that differ from the {len(labels)} expected"
    return None


def assemble(parts: Path, args, labels: np.ndarray, bounds: dict, key: str) -> None:
    """Check every shard (settings, count, labels, image size), write OUT, then remove the shards."""
    images = None  # filled shard by shard: rank 0 holds one copy of the batch, not two
    for k, (s, e) in bounds.items():
        path = shard_path(parts, k)
        problem = shard_problem(path, labels[s:e], key) if path.exists() else "is missing"
        if problem:
            fail(f"{path} {problem}; run the same command again to draw it")
        with np.load(path, allow_pickle=False) as shard:
            block = shard["arr_0"]
        if images is None:
            images = np.empty((args.num_samples, *block.shape[1:]), dtype=np.uint8)
        elif block.shape[1:] != images.shape[1:]:
            fail(f"{path} holds {block.shape[1:]} images, shard 0 holds {images.shape[1:]}; delete {parts}")
        images[s:e] = block
    save_npz(images, labels, args.out)
    for k in bounds:
        shard_path(parts, k).unlink()
    (parts / "settings.json").unlink()  # last: until then a rerun still recognises the shards
    for leftover in parts.iterdir():  # e.g. shards of a killed run with a larger --num-samples
        leftover.unlink()
    parts.rmdir()


def manifest_differs(parts: Path, settings: dict) -> bool:
    """Whether OUT.parts/ holds a manifest of other settings (or an unreadable one)."""
    try:
        return json.loads((parts / "settings.json").read_text()) != settings
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        return True


def clear_parts(parts: Path) -> None:
    """Remove what sample.py keeps in OUT.parts/ (shards, manifest, temp files) and the folder if then empty."""
    for entry in parts.iterdir():
        if entry.name == "settings.json" or SHARD_NAME.fullmatch(entry.name) or entry.name.endswith(".tmp"):
            entry.unlink()
    if not any(parts.iterdir()):
        parts.rmdir()


def write_manifest(parts: Path, settings: dict) -> None:
    """Record the sampling settings beside the shards; a manifest without any shard drawn is replaced."""
    manifest = parts / "settings.json"
    if not manifest.exists() or not any(parts.glob("shard-*.npz")):
        write_json(manifest, settings)


def check_manifest(parts: Path, settings: dict) -> None:
    """Refuse to resume shards that were drawn with other settings or from another checkpoint file."""
    try:
        old = json.loads((parts / "settings.json").read_text())
    except (OSError, ValueError) as e:
        fail(f"{parts / 'settings.json'} is unreadable ({type(e).__name__}); delete {parts} to start over")
    if old == settings:
        return
    if old.get("ckpt") != settings["ckpt"]:
        fail(f"{parts} holds shards drawn from another checkpoint: the --ckpt file is not the one they came from "
             f"(size:sha256 {old.get('ckpt')} then, {settings['ckpt']} now); sample with that checkpoint, or "
             f"delete {parts} to start over")
    diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
    fail(f"{parts} holds shards drawn with other settings {diff}; delete it or rerun with the same ones")


def run(args: argparse.Namespace) -> None:
    ext = Path(args.out).suffix.lower()
    is_npz = ext == ".npz"
    if not is_npz and ext not in IMAGE_FORMATS:
        fail(f"--out {args.out!r}: expected a .png/.jpg/.jpeg (grid) or .npz (sample batch) path")
    if is_npz and not args.num_samples:
        fail("--out *.npz needs --num-samples N")
    for name in ("num_samples", "per_class", "batch_size", "shard_size", "devices", "num_nodes", "steps",
                 "guide_channels"):
        value = getattr(args, name)
        if value is not None and value < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not (math.isfinite(args.cfg_scale) and 0 <= args.cfg_scale <= MAX_CFG_SCALE):
        fail(f"--cfg-scale must be between 0 and {MAX_CFG_SCALE:g}, got {args.cfg_scale}")
    if args.guidance_interval and not 0 <= args.guidance_interval[0] <= args.guidance_interval[1] <= 1:
        fail(f"--guidance-interval LO HI needs 0 <= LO <= HI <= 1, got {args.guidance_interval}")
    resolve_device(args.device)
    if args.vae:
        try:
            check_vae_source(args.vae)
        except CodecLoadError as e:
            fail(f"--vae: {e}")
    (write_npz if is_npz else write_grid)(args)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        with exit_on_signals():
            run(args)
    except Interrupted as e:
        resume = " (the same command continues from the shards drawn so far)" if args.out.lower().endswith(".npz") \
            else ""
        print(f"info: {e}{resume}", file=sys.stderr)
        raise


if __name__ == "__main__":
    main()
