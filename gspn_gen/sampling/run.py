"""Run a sampling request (`sample`): a class grid, a resumable sharded .npz batch, or images in memory.

Everything (preset, diffusion, codec, class names) is rebuilt from the checkpoint; EMA weights by default.
Before the first sample is drawn the request is checked as a whole: the output (exists: refused without
overwrite, unless it is the resumable continuation of the same settings; writable), one writer per
output (a lock beside it), what the model decides (`SampleRequest.check`), the codec (VAE) and the
network on this device, and the disk space and memory the result needs. Every refusal is a
SamplingError of one line; nothing is written before it.

A .npz is drawn in shards of `shard_size` samples in OUT.parts/, beside a manifest of the settings and
the checkpoint's fingerprint: the same request continues from the shards drawn so far, other settings
or a replaced checkpoint are refused (or, with overwrite, discarded). Shard k is drawn on rank
k mod world size (Lightning Fabric); rank 0 checks the output, holds its lock and assembles the file.
"""

from __future__ import annotations

import contextlib
import json
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from tqdm import tqdm

from gspn_gen.checkpoints import CheckpointError, fingerprint, nonfinite_tensors
from gspn_gen.checkpoints.build import load_module
from gspn_gen.codecs import CodecLoadError
from gspn_gen.fileio import (
    OutputError,
    available_memory,
    check_output,
    format_bytes,
    free_bytes,
    remove_stale_temps,
)
from gspn_gen.runlock import LockHeld, RunLock, output_lock
from gspn_gen.sampling.draw import (
    NonFiniteSamplesWarning,
    class_grid,
    generate,
    grid_bytes,
    image_bytes,
    preflight,
    save_image,
    save_npz,
)
from gspn_gen.sampling.request import SampleRequest, SamplingError, resolve_device
from gspn_gen.sampling.shards import (
    assemble,
    check_manifest,
    clear_parts,
    manifest_differs,
    shard_path,
    shard_problem,
    write_manifest,
)

# The settings a .npz's shards are drawn with, by the names its manifest has always used.
MANIFEST_KEYS = ("seed", "cfg_scale", "guidance_interval", "guide_channels", "sampler", "steps", "no_ema",
                 "num_samples", "shard_size")


@dataclass(frozen=True)
class Samples:
    """Images drawn in memory: uint8 (N, H, W, 3) and their int64 labels (N,)."""

    images: np.ndarray
    labels: np.ndarray


def sample(request: SampleRequest, module=None, verbose: bool = True) -> Samples | None:
    """Run `request`; with `module` (a loaded GenerationModule) instead of its checkpoint, on that module's
    device, in this process. Returns the images when `request.out` is None, else writes them there.

    `verbose`: a progress bar per batch and `info:`/`warning:` lines on stderr, the `wrote` line on stdout.
    Raises SamplingError (one line) for anything that keeps the request from running.
    """
    if module is None and request.ckpt is None:
        raise SamplingError("nothing to sample: give --ckpt (or a loaded module)")
    if request.out is None:
        return _in_memory(request, module, verbose)
    if request.is_batch:
        _write_npz(request, module, verbose)
    else:
        _write_grid(request, module, verbose)
    return None


# ---------------------------------------------------------------------------------------- in memory

def _in_memory(request: SampleRequest, module, verbose: bool) -> Samples:
    if module is None:
        module = load(request, resolve_device(request.device), verbose)
    else:
        request.check(module)
    labels = request.labels(module.hparams.num_classes)
    with progress(len(labels), "sampling", enabled=verbose) as bar:
        images = draw_range(module, request, labels, 0, len(labels), bar)
    return Samples(images, labels.numpy())


# ---------------------------------------------------------------------------------------- the model

def load(request: SampleRequest, device: torch.device, announce: bool = True):
    """The request's checkpoint on `device`, checked against the request (`SampleRequest.check`)."""
    try:
        module = load_module(request.ckpt, device)
    except CheckpointError as e:
        raise SamplingError(str(e)) from None
    if request.vae:
        codec = module.hparams.codec or {}
        if codec.get("name") != "sd-vae":
            raise SamplingError(f"--vae given, but this checkpoint's codec is {codec.get('name', 'identity')!r}, "
                                "not a VAE")
        module.hparams.codec = {**codec, "path": request.vae}
    request.check(module)
    prefix = "ema." if request.use_ema else "model."
    bad = nonfinite_tensors(module.state_dict(), prefix)
    if bad and announce:
        warn(f"checkpoint {request.ckpt!r} holds NaN/inf in {len(bad)} weight tensors of its "
             f"{'EMA' if request.use_ema else 'raw'} model (e.g. {bad[0]}): its samples will be black")
    return module


def prepare(module, device: torch.device, request: SampleRequest) -> int:
    """Load the codec and try the network on `device`; the decoded image side."""
    try:
        return preflight(module, device)
    except (ValueError, CodecLoadError, ImportError) as e:
        raise SamplingError(f"checkpoint {request.ckpt!r}: {e}") from None


def draw_range(module, request: SampleRequest, labels: torch.Tensor, start: int, stop: int, bar=None) -> np.ndarray:
    """Samples start..stop-1 (global ids, so seeds do not depend on batching) in batch_size chunks."""
    chunks = []
    for s in range(start, stop, request.batch_size):
        e = min(s + request.batch_size, stop)
        try:
            chunks.append(generate(module, labels[s:e], seed=request.seed, indices=range(s, e),
                                   cfg_scale=request.cfg_scale, steps=request.steps, sampler=request.sampler,
                                   guidance_interval=request.guidance_interval,
                                   guide_channels=request.guide_channels, use_ema=request.use_ema))
        except (ValueError, CodecLoadError) as err:  # a VAE that cannot load, a bad process setting
            raise SamplingError(str(err)) from None
        if bar is not None:
            bar.update(e - s)
    return np.concatenate(chunks)


# ---------------------------------------------------------------------------------------- a grid

def _write_grid(request: SampleRequest, module, verbose: bool) -> None:
    out = Path(request.out)
    try:
        check_output(out, request.overwrite)
    except OutputError as e:
        raise SamplingError(str(e)) from None
    with output_locked(out):
        device = resolve_device(request.device) if module is None else next(module.parameters()).device
        module = load(request, device, verbose) if module is None else _checked(request, module)
        classes = request.grid_classes(module.hparams.num_classes)
        side = prepare(module, device, request)
        n = len(classes) * request.per_class
        grid = grid_bytes(len(classes), request.per_class, side)
        problem = room_problem(out, grid, n * image_bytes(side) + 2 * grid,
                               f"a grid of {len(classes)} x {request.per_class} images of {side}x{side}")
        if problem:
            raise SamplingError(f"{problem}; ask for fewer --classes or a smaller --per-class")
        labels = request.labels(module.hparams.num_classes)
        with nonfinite_report(len(labels)), progress(len(labels), "sampling", enabled=verbose) as bar:
            images = draw_range(module, request, labels, 0, len(labels), bar)
        remove_stale_temps(out.absolute().parent, out.name)
        save_image(class_grid(images, labels.tolist(), request.per_class, module.hparams.class_names), request.out)
    if verbose:
        print(f"wrote {request.out} ({len(classes)} classes x {request.per_class}, cfg {request.cfg_scale})")


def _checked(request: SampleRequest, module):
    request.check(module)
    return module


# ---------------------------------------------------------------------------------------- a batch

class _OneProcess:
    """What the batch writer uses of Lightning Fabric, for a module already loaded in this process."""

    global_rank, world_size = 0, 1

    def __init__(self, device: torch.device):
        self.device = device

    def broadcast(self, obj, src: int = 0):
        return obj

    def barrier(self) -> None:
        pass


def _ranks(request: SampleRequest):
    """Lightning Fabric over the request's devices and nodes, launched (one process: this one)."""
    from lightning.fabric import Fabric
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    world = request.devices * request.num_nodes
    accelerator, devices = request.accelerator, request.devices
    if request.device != "auto" and accelerator == "auto" and world == 1:
        device = resolve_device(request.device)
        accelerator, devices = device.type, [device.index] if device.index is not None else 1
    try:
        fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=request.num_nodes,
                        strategy="ddp" if world > 1 else "auto")
    except (MisconfigurationException, ValueError, RuntimeError) as e:
        raise SamplingError(f"--accelerator {request.accelerator} --devices {request.devices}: "
                            f"{(str(e).splitlines() or [''])[0]}") from None
    fabric.launch()
    return fabric


def _write_npz(request: SampleRequest, module, verbose: bool) -> None:
    """The process that launches the others (rank 0) checks the output and holds its lock throughout."""
    out = Path(request.out)
    with contextlib.ExitStack() as stack:
        if rank_zero_only.rank == 0:  # before the other ranks exist
            parts = Path(f"{request.out}.parts")
            try:
                # a .npz with shards beside it is a run killed while assembling or cleaning up: it continues
                check_output(out, request.overwrite or (parts / "settings.json").exists())
            except OutputError as e:
                raise SamplingError(str(e)) from None
            stack.enter_context(output_locked(out))
        _draw_npz(request, module, verbose)


def _draw_npz(request: SampleRequest, module, verbose: bool) -> None:
    if module is None:
        ranks = _ranks(request)
    elif request.devices * request.num_nodes > 1:
        raise SamplingError("a loaded model samples in this process only: --devices 1 --num-nodes 1")
    else:
        ranks = _OneProcess(next(module.parameters()).device)
    rank0 = ranks.global_rank == 0
    module = load(request, ranks.device, announce=rank0 and verbose) if module is None else _checked(request, module)
    side = prepare(module, ranks.device, request)
    out, parts = Path(request.out), Path(f"{request.out}.parts")
    settings = {k: getattr(request, k) for k in MANIFEST_KEYS if k != "no_ema"}
    settings["no_ema"] = not request.use_ema
    # what the checkpoint file holds, not where it is: a file replaced at the same path is another model
    settings["ckpt"] = ranks.broadcast(fingerprint(request.ckpt) if rank0 and request.ckpt else None, src=0)
    settings = json.loads(json.dumps(settings))
    problem = None
    if rank0:
        if request.overwrite and manifest_differs(parts, settings):
            clear_parts(parts)  # shards of other settings: overwrite discards them
        problem = npz_room_problem(request, parts, side)
    problem = ranks.broadcast(problem, src=0)
    if problem:
        raise SamplingError(problem)
    labels = request.labels(module.hparams.num_classes)
    key = json.dumps(settings, sort_keys=True)
    size, total = request.shard_size, request.num_samples
    shards = range(-(-total // size))
    bounds = {k: (k * size, min((k + 1) * size, total)) for k in shards}
    if rank0:  # what a killed run left half-written
        remove_stale_temps(out.absolute().parent, out.name)
        remove_stale_temps(parts)
        write_manifest(parts, settings)
    ranks.barrier()
    check_manifest(parts, settings)  # on every rank, so a mismatch stops all of them
    mine = [k for k in shards if k % ranks.world_size == ranks.global_rank]
    todo = []
    for k in mine:
        path, (s, e) = shard_path(parts, k), bounds[k]
        problem = shard_problem(path, labels[s:e].numpy(), key) if path.exists() else "missing"
        if problem not in (None, "missing") and verbose:
            warn(f"{path} {problem}: drawing it again")
        if problem:
            todo.append(k)
    if rank0 and len(mine) > len(todo) and verbose:
        print(f"resuming: {len(mine) - len(todo)} of rank 0's shards already done", file=sys.stderr)
    count = sum(bounds[k][1] - bounds[k][0] for k in todo)
    desc = f"sampling (rank 0 of {ranks.world_size})" if ranks.world_size > 1 else "sampling"
    with nonfinite_report(count), progress(count, desc, enabled=rank0 and verbose) as bar:
        for k in todo:
            s, e = bounds[k]
            images = draw_range(module, request, labels, s, e, bar)
            save_npz(images, labels[s:e].numpy(), str(shard_path(parts, k)), settings=np.array(key))
    ranks.barrier()
    if rank0:
        assemble(parts, request.out, labels.numpy(), bounds, key)
        if verbose:
            print(f"wrote {request.out} ({total} samples, classes balanced, cfg {request.cfg_scale})")


# ---------------------------------------------------------------------------------------- room, locks, reports

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


def npz_room_problem(request: SampleRequest, parts: Path, side: int) -> str | None:
    """Whether the shards still to draw plus the assembled .npz fit on disk, and the batch in memory."""
    size, total = image_bytes(side), request.num_samples
    drawn = len(list(parts.glob("shard-*.npz"))) if parts.is_dir() else 0
    todo = max(total - drawn * request.shard_size, 0)
    problem = room_problem(Path(request.out), (todo + total) * (size + 8), total * size,
                           f"--num-samples {total} at {side}x{side} ({format_bytes(size)} per sample, "
                           "as shards and then as the assembled .npz)")
    if problem is None:
        return None
    fits = min(free_bytes(Path(request.out).absolute().parent) // (2 * (size + 8)),
               (available_memory() or 2**62) // size)
    return f"{problem}: at most about {fits} samples fit"


@contextmanager
def output_locked(out: Path):
    """Hold OUT's lock for the block: one sampling run per output."""
    try:
        with RunLock(output_lock(out.absolute()), f"--out {str(out)!r}"):
            yield
    except LockHeld as e:
        raise SamplingError(f"{e}: wait for that sampling run to end, or choose another --out") from None


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


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
