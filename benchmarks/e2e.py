"""End-to-end benchmark of the generators (DESIGN.md §9): training, forward and sampling speed, memory, profile.

    python benchmarks/e2e.py [--presets GSPN-XL/2 DiT-XL/2 GSPN-paper-XL/2] [--train 256x32 512x8]
                             [--resolutions 256 512 1024 2048] [--sample 256x16 512x4] [--steps 10]
                             [--no-compile] [--max-seconds S] [--json PATH] [--tiny]

For each preset, in three passes so that a run cut short by --max-seconds keeps the most telling cells
(the first two presets, the ones the DESIGN.md §9 targets compare, go first in each pass):
1. eager: training images/s and peak `torch.cuda.max_memory_allocated` per PXxBATCH of --train, the real
   training step of `GenerationModule` as Lightning runs it with precision "bf16-mixed" and
   gradient_clip_val 1.0 (diffusion loss under bf16 autocast, backward, grad-norm clipping, fused AdamW,
   LR-scheduler step, EMA update; weights, gradients, optimizer state and EMA all on the GPU); forward ms
   per image (no grad, EMA weights, bf16 autocast) at each of --resolutions, on batches of as many latent
   pixels as 16 images at 256 px (16 / 4 / 1 / 1 images at 256 / 512 / 1024 / 2048 px); guided sampling
   images/s per PXxBATCH of --sample (DDIM, --sample-steps 50, classifier-free guidance 1.5, EMA, bf16);
2. profile (the first GSPN preset; run right after the first two presets' eager pass): device time of one training step and one forward at the first and
   the third training resolution's sizes (256 px batch 32, 1024 px batch 2 by default), split into op
   classes: scan (the gspn_mix op), projections (the mixer's linear and 1x1/depthwise convolutions),
   attention (SDPA), mlp, norms (LayerNorms, adaLN modulation) and other (embedders, loss, optimizer,
   EMA), each op and its backward attributed to the module that ran it;
3. compiled: the training cells again with every block compiled (`DiffusionBackbone.compile_blocks`,
   what `--model.compile true` does; static shapes); warm-up steps include the compilation, which is
   not started with less than 45 s to the deadline. GSPN-XL/2 and DiT-XL/2 go first.
A preset may carry constructor overrides, NAME:key=value,... (GSPN-XL/2:recompute=false).
Models are built for 32x32 latents (256 px); the backbone derives its token grid from the input, so the
same model trains and samples at 512 px. Times: CUDA events after warm-up on a GPU, perf_counter on the
CPU. Out of memory is reported as "OOM", a cell past --max-seconds as "skipped", any other failure as
"error: ..." (exit status 1). Prints tables; writes JSON (device, versions, date, every cell, the
profile, and GSPN-XL/2 / DiT-XL/2 ratios) after every pass, plus a plot of forward ms vs resolution
and the profiler's top-ops tables: to --json (a file, or a folder for the default name
e2e-<device>-<date>.json), and a copy in benchmarks/results/ on a GPU.
--tiny runs on the CPU in under a minute (tests/benchmarks/test_e2e.py): GSPN-T/2 and DiT-T/2 built for
1x16x16 pixels and 10 classes, pixel space, fp32; the compiled pass (aot_eager backend) and the
profile on the first training cell only.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from gspn_gen.kernels import available_backends

from gspn_gen.diffusion import cfg_model_fn
from gspn_gen.fileio import write_json, write_text
from gspn_gen.lit import GenerationModule, Optim
from gspn_gen.models.zoo import MODELS, count_params
from gspn_gen.report import cpu_name, log_log_plot, slug

RESULTS = Path(__file__).resolve().parent / "results"
OP_CLASSES = ("scan", "projections", "attention", "mlp", "norms", "other")


@dataclass(frozen=True)
class Mode:
    """Defaults of a run: what the models are built for and what is measured."""

    presets: list[str]
    train: list[tuple[int, int]]             # (px, batch) training cells
    resolutions: list[int]                   # forward image sides in px
    sample: list[tuple[int, int]]            # (px, batch) guided-sampling cells
    sample_steps: int
    steps: int                               # timed training steps; most forward reps
    warmup: int                              # untimed training steps first (compilation included)
    latent_factor: int                       # px per latent pixel (SD VAE: 8)
    data: dict                               # GenerationModule's num_classes, in_channels, input_size
    forward_images: int                      # images per forward batch at the model's own size
    compile_backend: str
    compiled_cells: int                      # compiled pass: the first this many training cells
    compile_reserve_s: float                 # compiled pass: a preset starts only with this much time left
    forward_budget_s: float                  # timed forward calls per cell: as many as fit (1..steps)


GPU = Mode(["GSPN-XL/2", "DiT-XL/2", "GSPN-paper-XL/2"], train=[(256, 32), (512, 8)],
           resolutions=[256, 512, 1024, 2048], sample=[(256, 16), (512, 4)], sample_steps=50, steps=10,
           warmup=3, latent_factor=8, data={"num_classes": 1000, "in_channels": 4, "input_size": 32},
           forward_images=16, compile_backend="inductor", compiled_cells=2, compile_reserve_s=45.0,
           forward_budget_s=1.0)
TINY = Mode(["GSPN-T/2", "DiT-T/2"], train=[(16, 4), (32, 2)], resolutions=[16, 32], sample=[(16, 4)],
            sample_steps=3, steps=2, warmup=1, latent_factor=1,
            data={"num_classes": 10, "in_channels": 1, "input_size": 16}, forward_images=4,
            compile_backend="aot_eager", compiled_cells=1, compile_reserve_s=0.0,
            forward_budget_s=0.2)
CFG_SCALE = 1.5
TARGETS = {  # GSPN-XL/2 vs DiT-XL/2 (DESIGN.md §9): (cell, ratio >= target, or <= for memory)
    "train 256 px b32 images/s": (1.0, ">="), "train 256 px b32 peak memory": (1.0, "<="),
    "train 512 px b8 images/s": (1.3, ">="), "forward 1024 px speed-up": (2.0, ">="),
    "forward 2048 px speed-up": (4.0, ">="), "sampling 512 px images/s": (1.3, ">="),
}


# ---------------------------------------------------------------------------------------------
# Timing and failure handling


def timed(fn, reps: int, device: torch.device) -> float:
    """Seconds for `reps` calls of fn(): CUDA events on a GPU, perf_counter on the CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return time.perf_counter() - t0


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def attempt(deadline: float, fn, *args):
    """fn(*args), or a string saying why there is no result: "skipped" past the deadline, "OOM", "error: ..."."""
    if time.perf_counter() > deadline:
        return "skipped"
    try:
        return fn(*args)
    except torch.cuda.OutOfMemoryError:
        status = "OOM"
    except Exception as err:  # noqa: BLE001 - a failed measurement is reported in its row; the others still run
        traceback.print_exc()
        status = f"error: {type(err).__name__}: {err}"[:300]
    free_memory()  # after the except block, so the traceback's tensors are gone
    return status


def cells(result, keys: list[str]) -> dict:
    """A measurement's dict, or every key holding the reason it failed."""
    return dict.fromkeys(keys, result) if isinstance(result, str) else result


# ---------------------------------------------------------------------------------------------
# Measurements


def autocast(device: torch.device):
    """Lightning's "bf16-mixed" on a GPU; fp32 on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def latent_batch(mode: Mode, px: int, batch: int, device: torch.device):
    """Random (x, t, y) for `batch` images of `px` pixels: latents (B, C, px/f, px/f), times, labels."""
    side = px // mode.latent_factor
    x = torch.randn(batch, mode.data["in_channels"], side, side, device=device)
    t = torch.randint(0, 1000, (batch,), device=device).float()
    y = torch.randint(0, mode.data["num_classes"], (batch,), device=device)
    return x, t, y


def train_step(module: GenerationModule, opt, sched, px: int, batch: int, mode: Mode, device: torch.device):
    """One optimisation step on a random batch, in Lightning's order (module docstring)."""
    x, _, y = latent_batch(mode, px, batch, device)
    params = [p for group in opt.param_groups for p in group["params"]]

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast(device):
            loss = module.diffusion.training_losses(module.model, x, y)["loss"].mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        module._update_ema()

    return step


def measure_train(step, batch: int, mode: Mode, steps: int, device: torch.device) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(mode.warmup):
        step()
    seconds = timed(step, steps, device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"images_per_s": batch * steps / seconds, "step_ms": seconds / steps * 1e3, "peak_mem_gib": peak}


def forward_batch(mode: Mode, px: int) -> int:
    """Images per forward batch at px: as many latent pixels as `forward_images` at the model's size."""
    return max(1, mode.forward_images * mode.data["input_size"] ** 2 // (px // mode.latent_factor) ** 2)


def measure_forward(ema: torch.nn.Module, px: int, mode: Mode, max_reps: int, device: torch.device) -> dict:
    batch = forward_batch(mode, px)
    x, t, y = latent_batch(mode, px, batch, device)

    def forward() -> None:
        with torch.no_grad(), autocast(device):
            ema(x, t, y)

    forward()  # warm-up: kernel compilation, allocator growth
    first = timed(forward, 1, device)
    reps = max(1, min(max_reps, int(mode.forward_budget_s / max(first, 1e-6))))
    seconds = first + (timed(forward, reps - 1, device) if reps > 1 else 0.0)
    return {"forward_batch": batch, "ms_per_image": seconds / reps / batch * 1e3}


def measure_sampling(module: GenerationModule, px: int, batch: int, mode: Mode, device: torch.device) -> dict:
    """Guided DDIM sampling from noise to latents (no decoding) with the EMA model."""
    noise, _, labels = latent_batch(mode, px, batch, device)
    model_fn = cfg_model_fn(module.ema, CFG_SCALE, module.null_class, time_scale=module.diffusion.time_scale)

    def sample(steps: int) -> None:
        with torch.no_grad(), autocast(device):
            module.diffusion.sample(model_fn, noise, labels, sampler="ddim", steps=steps)

    sample(2)  # warm-up
    seconds = timed(lambda: sample(mode.sample_steps), 1, device)
    return {"images_per_s": batch / seconds, "seconds": seconds}


# ---------------------------------------------------------------------------------------------
# Profile: device time by op class


def _op_class_of_module(name: str) -> str | None:
    """The op class of a backbone submodule, by its qualified name; None: not classified here."""
    parts = name.split(".")
    if "mixer" in parts:
        leaf = parts[-1]
        if leaf == "norm":
            return "norms"
        if leaf in ("in_proj", "out_proj", "conv", "proxy", "gate_proj", "lam_proj", "u_proj", "direct_proj",
                    "conv_out", "qkv", "proj"):
            return "projections"
        return None
    if parts[-1] == "mlp" or "mlp" in parts[:-1]:
        return "mlp"
    if parts[-1] in ("norm1", "norm2", "adaLN_modulation", "norm_final"):
        return "norms"
    return None


def _annotate(model: torch.nn.Module, stack: ExitStack) -> None:
    """Wrap the forward of every classified module in a profiler range named "cls:<op class>"."""
    for name, module in model.named_modules():
        cls = _op_class_of_module(name)
        if cls is None:
            continue
        open_ranges = []

        def pre(mod, args, cls=cls, open_ranges=open_ranges):
            open_ranges.append(torch.profiler.record_function(f"cls:{cls}"))
            open_ranges[-1].__enter__()

        def post(mod, args, out, open_ranges=open_ranges):
            open_ranges.pop().__exit__(None, None, None)

        stack.callback(module.register_forward_pre_hook(pre).remove)
        stack.callback(module.register_forward_hook(post).remove)


def classify_profile(events, device: torch.device) -> dict[str, float]:
    """Self device (CPU: cpu) time in ms per op class.

    A forward op belongs to the innermost "cls:" range around it (the gspn op always to "scan", SDPA to
    "attention"); a backward op to the class of the forward op with its autograd sequence number;
    anything else to "other". Recomputation in backward runs the forward modules again, so it is
    attributed like the forward. Kernels the profiler did not link to a CPU op count by their name
    (the GSPN kernels' names hold "gspn").
    """
    use_device = device.type == "cuda"
    by_seq: dict[int, str] = {}

    def own_class(event) -> str | None:
        name = event.name
        if "gspn" in name and "::" in name:
            return "scan"
        if "scaled_dot_product" in name or "flash_attention" in name or "efficient_attention" in name:
            return "attention"
        return None

    def ancestors(event):
        while event is not None:
            yield event
            event = event.cpu_parent

    classes: dict[int, str] = {}
    for event in events:  # forward ranges
        for a in ancestors(event):
            if a.name.startswith("cls:"):
                classes[id(event)] = a.name[4:]
                break
    for event in events:
        cls = own_class(event) or classes.get(id(event))
        if cls is not None and getattr(event, "sequence_nr", -1) >= 0 and not event.name.startswith("autograd::"):
            by_seq.setdefault(event.sequence_nr, cls)
    times: dict[str, float] = defaultdict(float)
    kernels: dict[str, float] = defaultdict(float)  # device time of kernels not tied to a CPU op, by name
    for event in events:
        if event.device_type != torch.autograd.DeviceType.CPU:
            kernels[event.name] += event.self_device_time_total
            continue
        for kernel in event.kernels:
            kernels[kernel.name] -= kernel.duration
        cls = None
        for a in ancestors(event):
            cls = own_class(a)
            if cls:
                break
            if a.name.startswith("autograd::engine::evaluate_function") and a.sequence_nr in by_seq:
                cls = by_seq[a.sequence_nr]
                break
            if a.name.startswith("cls:"):
                cls = a.name[4:]
                break
        us = event.self_device_time_total if use_device else event.self_cpu_time_total
        times[cls or "other"] += us / 1e3
    for name, us in kernels.items():  # e.g. launched by CuPy where the profiler did not link them to an op
        if us > 0:
            times["scan" if "gspn" in name.lower() else "other"] += us / 1e3
    return {c: times.get(c, 0.0) for c in OP_CLASSES}


def profile_classes(fn, model: torch.nn.Module, device: torch.device) -> tuple[dict, str]:
    """(ms per op class of one call of fn(), the profiler's top-ops table)."""
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm-up outside the profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with ExitStack() as stack:
        _annotate(model, stack)
        with profile(activities=activities) as prof:
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
    events = prof.events()
    ms = classify_profile(events, device)
    total = sum(ms.values())
    kind = "device" if device.type == "cuda" else "cpu"
    table = prof.key_averages().table(sort_by=f"self_{kind}_time_total", row_limit=20)
    return {"ms": ms, "total_ms": total, "share": {c: v / total if total else 0.0 for c, v in ms.items()},
            "largest": max(ms, key=ms.get)}, table


# ---------------------------------------------------------------------------------------------
# Passes


def parse_preset(spec: str) -> tuple[str, dict]:
    """"NAME" or "NAME:key=value,...", e.g. GSPN-XL/2:recompute=false or GSPN-XL/2:gspn_backend=cuda-portable
    -> (name, model_args overrides); values are booleans, None, numbers or else strings."""
    name, _, rest = spec.partition(":")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"preset override {item!r} in {spec!r} is not key=value")
        lowered = text.strip().lower()
        if lowered in ("true", "false", "none"):
            overrides[key.strip()] = {"true": True, "false": False, "none": None}[lowered]
        else:
            for convert in (int, float, str.strip):
                try:
                    overrides[key.strip()] = convert(text)
                    break
                except ValueError:
                    continue
    return name, overrides


def build_module(spec: str, mode: Mode, device: torch.device) -> GenerationModule:
    """The training module as the CLI builds it (constant LR: the cosine schedule needs a trainer)."""
    name, overrides = parse_preset(spec)
    with torch.device(device):  # weights initialised in place: no slow CPU init of a 700M model
        module = GenerationModule(model=name, model_args=overrides, **mode.data,
                                  optim=Optim(lr=1e-4, lr_schedule="constant", fused_adamw=device.type == "cuda"))
    module.to(device)  # records the device on the LightningModule; the tensors are there already
    module.model.train()
    return module


TRAIN_KEYS = ["images_per_s", "step_ms", "peak_mem_gib"]


def train_cells(module, cells_px_batch, mode, args, device, deadline, compiled: bool) -> list[dict]:
    optim = module.configure_optimizers()
    opt, sched = optim["optimizer"], optim["lr_scheduler"]["scheduler"]
    out = []
    for px, batch in cells_px_batch:
        step = train_step(module, opt, sched, px, batch, mode, device)
        result = cells(attempt(deadline, measure_train, step, batch, mode, args.steps, device), TRAIN_KEYS)
        out.append({"px": px, "batch_size": batch, "compiled": compiled, **result})
        print(f"  train{' compiled' if compiled else ''} {px} px batch {batch}: "
              f"{_fmt(result['images_per_s'])} img/s, peak {_fmt(result['peak_mem_gib'])} GiB", flush=True)
        step = None  # frees this batch's inputs before the next
        opt.zero_grad(set_to_none=True)
        free_memory()
    return out


def eager_pass(name: str, mode: Mode, args, device: torch.device, deadline: float) -> dict:
    row = {"preset": name, "params": None, "train": [], "forward": [], "sample": []}
    module = attempt(deadline, build_module, name, mode, device)
    if isinstance(module, str):  # not even built: every cell carries why
        print(f"{name}: {module}", flush=True)
        row["train"] = [{"px": px, "batch_size": b, "compiled": False, **cells(module, TRAIN_KEYS)}
                        for px, b in args.train]
        row["forward"] = [{"px": px, **cells(module, ["forward_batch", "ms_per_image"])} for px in args.resolutions]
        row["sample"] = [{"px": px, "batch_size": b, **cells(module, ["images_per_s", "seconds"])}
                         for px, b in args.sample]
        return row
    row["params"] = count_params(module.model)
    print(f"{name}: {row['params'] / 1e6:.1f}M parameters", flush=True)
    row["train"] = train_cells(module, args.train, mode, args, device, deadline, compiled=False)
    for px in args.resolutions:
        result = cells(attempt(deadline, measure_forward, module.ema, px, mode, args.steps, device),
                       ["forward_batch", "ms_per_image"])
        row["forward"].append({"px": px, "latent": px // mode.latent_factor, **result})
        print(f"  forward {px} px: {_fmt(result['ms_per_image'])} ms/image", flush=True)
        free_memory()
    for px, batch in args.sample:
        result = cells(attempt(deadline, measure_sampling, module, px, batch, mode, device), ["images_per_s", "seconds"])
        row["sample"].append({"px": px, "batch_size": batch, "steps": mode.sample_steps, "cfg_scale": CFG_SCALE,
                              **result})
        print(f"  sampling {px} px batch {batch}, {mode.sample_steps} DDIM steps, cfg {CFG_SCALE}: "
              f"{_fmt(result['images_per_s'])} img/s", flush=True)
        free_memory()
    return row


def profile_pass(name: str, mode: Mode, args, device: torch.device, deadline: float) -> tuple[list, str]:
    """Op-class profiles of one training step and one forward at the profile sizes."""
    module = attempt(deadline, build_module, name, mode, device)
    if isinstance(module, str):
        return [{"preset": name, "error": module}], ""
    optim = module.configure_optimizers()
    opt, sched = optim["optimizer"], optim["lr_scheduler"]["scheduler"]
    profiles, tables = [], []
    for px, batch in args.profile:
        step = train_step(module, opt, sched, px, batch, mode, device)
        x, t, y = latent_batch(mode, px, batch, device)

        def forward(x=x, t=t, y=y) -> None:
            with torch.no_grad(), autocast(device):
                module.ema(x, t, y)

        for what, fn, model in (("train step", step, module.model), ("forward", forward, module.ema)):
            result = attempt(deadline, profile_classes, fn, model, device)
            entry = {"preset": name, "what": what, "px": px, "batch_size": batch}
            if isinstance(result, str):
                entry["error"] = result
            else:
                entry.update(result[0])
                tables.append(f"== {name}, {what}, {px} px, batch {batch}\n{result[1]}\n")
                shares = ", ".join(f"{c} {v:.0%}" for c, v in entry["share"].items())
                print(f"  profile {what} {px} px b{batch}: {entry['total_ms']:.1f} ms; {shares}", flush=True)
            profiles.append(entry)
        step = None
        opt.zero_grad(set_to_none=True)
        free_memory()
    return profiles, "".join(tables)


def compiled_pass(name: str, mode: Mode, args, device: torch.device, deadline: float) -> list[dict]:
    todo = args.train[:mode.compiled_cells]
    # compilation takes tens of seconds on a GPU: not started when less than that is left
    reserve = deadline - mode.compile_reserve_s
    module = attempt(reserve, build_module, name, mode, device)
    if isinstance(module, str):
        return [{"px": px, "batch_size": b, "compiled": True, **cells(module, TRAIN_KEYS)} for px, b in todo]
    torch._dynamo.reset()
    # static shapes: each training size gets its own graph, as in a training run at one size
    module.model.compile_blocks(backend=mode.compile_backend, dynamic=False)
    print(f"{name}, blocks compiled ({mode.compile_backend}):", flush=True)
    return train_cells(module, todo, mode, args, device, deadline, compiled=True)


# ---------------------------------------------------------------------------------------------
# Output


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v if len(v) <= 9 else v[:8] + "~"
    return f"{v:.2f}" if v < 100 else f"{v:.0f}"


def _cell(cells_: list[dict], key: str, **match):
    for c in cells_:
        if all(c.get(k) == v for k, v in match.items()):
            v = c.get(key)
            return v if isinstance(v, float) else None
    return None


def ratios(rows: list[dict], gspn: str = "GSPN-XL/2", dit: str = "DiT-XL/2") -> dict:
    """GSPN vs DiT on the DESIGN.md §9 cells (eager; compiled where both compiled), with the targets."""
    by = {r["preset"]: r for r in rows}
    if gspn not in by or dit not in by:
        return {}
    g, d = by[gspn], by[dit]

    def ratio(a, b):
        return a / b if a is not None and b else None

    out = {}
    for compiled in (False, True):
        tag = " compiled" if compiled else ""
        for px, b in ((256, 32), (512, 8)):
            out[f"train {px} px b{b} images/s{tag}"] = ratio(
                _cell(g["train"], "images_per_s", px=px, batch_size=b, compiled=compiled),
                _cell(d["train"], "images_per_s", px=px, batch_size=b, compiled=compiled))
            out[f"train {px} px b{b} peak memory{tag}"] = ratio(
                _cell(g["train"], "peak_mem_gib", px=px, batch_size=b, compiled=compiled),
                _cell(d["train"], "peak_mem_gib", px=px, batch_size=b, compiled=compiled))
    for px in (256, 512, 1024, 2048):
        out[f"forward {px} px speed-up"] = ratio(_cell(d["forward"], "ms_per_image", px=px),
                                                 _cell(g["forward"], "ms_per_image", px=px))
    for px in (256, 512):
        out[f"sampling {px} px images/s"] = ratio(_cell(g["sample"], "images_per_s", px=px),
                                                  _cell(d["sample"], "images_per_s", px=px))
    result = {}
    for key, value in out.items():
        entry = {"ratio": value}
        if key in TARGETS:
            target, sense = TARGETS[key]
            entry.update(target=target, sense=sense,
                         met=None if value is None else (value >= target if sense == ">=" else value <= target))
        result[key] = entry
    return {"gspn": gspn, "dit": dit, "cells": result}


def print_tables(result: dict) -> None:
    rows = result["rows"]
    print(f"\n{result['device']}, torch {result['torch']}, gspn backends {result['gspn_backends']}, "
          f"{result['settings']['precision']}")
    heads = [f"{c['px']}px b{c['batch_size']}" + (" comp" if c["compiled"] else "") + " img/s"
             for c in (rows[0]["train"] if rows else [])]
    print(f"{'preset':<18} {'params (M)':>10} " + " ".join(f"{h:>22} {'GiB':>6}" for h in heads))
    for row in rows:
        train = " ".join(f"{_fmt(c['images_per_s']):>22} {_fmt(c['peak_mem_gib']):>6}" for c in row["train"])
        params = "-" if row["params"] is None else f"{row['params'] / 1e6:.1f}"
        print(f"{row['preset']:<18} {params:>10} {train}")
    print("forward ms per image (EMA, no grad) | guided sampling images/s")
    if rows:
        sides = [f"{c['px']} px" for c in rows[0]["forward"]], [f"{c['px']} px" for c in rows[0]["sample"]]
        print(f"{'preset':<18} " + " ".join(f"{h:>9}" for h in sides[0]) + " | "
              + " ".join(f"{h:>9}" for h in sides[1]))
    for row in rows:
        print(f"{row['preset']:<18} " + " ".join(f"{_fmt(c['ms_per_image']):>9}" for c in row["forward"]) + " | "
              + " ".join(f"{_fmt(c['images_per_s']):>9}" for c in row["sample"]))
    for p in result.get("profile", []):
        if "ms" in p:
            print(f"profile {p['preset']} {p['what']} {p['px']} px b{p['batch_size']}: {p['total_ms']:.1f} ms, "
                  + ", ".join(f"{c} {v:.1f}" for c, v in p["ms"].items()) + f"; largest: {p['largest']}")
    summary = result.get("ratios") or {}
    if summary:
        print(f"{summary['gspn']} vs {summary['dit']}:")
        for key, e in summary["cells"].items():
            verdict = {True: "met", False: "MISSED", None: "-"}[e.get("met")]
            target = f" (target {e['sense']} {e['target']}: {verdict})" if "target" in e else ""
            print(f"  {key:<36} {_fmt(e['ratio'])}{target}")


def plot_forward(result: dict, path: Path) -> bool:
    """Forward ms per image vs resolution, one line per preset (log-log); False without matplotlib."""
    series = {row["preset"]: [(c["px"], c["ms_per_image"]) for c in row["forward"]
                              if isinstance(c["ms_per_image"], float)] for row in result["rows"]}
    return log_log_plot(path, series, "image side (px)", "forward ms per image",
                        f"{result['device']}, {result['settings']['precision']}")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _px_batch(text: str) -> tuple[int, int]:
    try:
        px, batch = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected PXxBATCH such as 256x32, got {text!r}") from None
    if px < 1 or batch < 1:
        raise argparse.ArgumentTypeError(f"expected positive PXxBATCH, got {text!r}")
    return px, batch


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python benchmarks/e2e.py", description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+",
                        help=f"model presets, each NAME or NAME:key=value,... with constructor overrides, e.g. "
                             f"GSPN-XL/2:recompute=false (default {' '.join(GPU.presets)})")
    parser.add_argument("--train", nargs="+", type=_px_batch, help="training cells PXxBATCH (default 256x32 512x8)")
    parser.add_argument("--resolutions", nargs="+", type=_positive_int,
                        help="forward image sides in px (default 256 512 1024 2048)")
    parser.add_argument("--sample", nargs="*", type=_px_batch,
                        help="guided sampling cells PXxBATCH (default 256x16 512x4); none given: no sampling")
    parser.add_argument("--sample-steps", type=_positive_int, help="DDIM steps per sample (default 50)")
    parser.add_argument("--profile", nargs="*", type=_px_batch,
                        help="op-class profile sizes PXxBATCH for the first GSPN preset (default: the first "
                             "training cell and 1024x2; --tiny: the first training cell); none given: no profile")
    parser.add_argument("--steps", type=_positive_int, help="timed training steps, most forward reps (default 10)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled training pass")
    parser.add_argument("--json", type=Path,
                        help="output JSON path, or an existing folder for the default name e2e-<device>-<date>.json")
    parser.add_argument("--max-seconds", type=float, default=float("inf"),
                        help="measurements starting after this many seconds are reported as 'skipped'")
    parser.add_argument("--tiny", action="store_true", help="tiny presets on the CPU, in under a minute")
    return parser


def parse_args(argv) -> tuple[argparse.Namespace, Mode]:
    """The command line with the mode's defaults filled in and checked (a bad value: argparse's error, exit 2)."""
    parser = _parser()
    args = parser.parse_args(argv)
    mode = TINY if args.tiny else GPU
    if args.sample_steps:
        mode = replace(mode, sample_steps=args.sample_steps)
    for key in ("presets", "train", "resolutions", "sample", "steps"):
        if getattr(args, key) is None:
            setattr(args, key, getattr(mode, key))
    if args.profile is None:
        args.profile = [args.train[0]] if args.tiny else [args.train[0], (1024, 2)]
    try:
        names = [parse_preset(spec)[0] for spec in args.presets]
    except ValueError as err:
        parser.error(str(err))
    unknown = [name for name in names if name not in MODELS]
    if unknown:
        parser.error(f"unknown preset(s) {unknown}; known: {', '.join(MODELS)}")
    sizes = args.resolutions + [px for px, _ in args.train + args.sample + args.profile]
    bad = sorted({px for px in sizes if px % mode.latent_factor})
    if bad:
        parser.error(f"image sides must be multiples of {mode.latent_factor} px (the latent factor), got {bad}")
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("no CUDA device is visible to PyTorch; use --tiny for the CPU run")
    return args, mode


def output_paths(args, device_name: str) -> list[Path]:
    """Where the JSON goes: --json (a file, or a folder for the default name), plus a copy in results/ on a GPU."""
    default_name = f"e2e-{slug(device_name)}-{_dt.date.today().isoformat()}.json"
    if args.json is not None and args.json.is_dir():
        path = args.json / default_name
    else:
        path = args.json or (Path(tempfile.mkdtemp(prefix="e2e-")) if args.tiny else RESULTS) / default_name
    return [path] + ([] if args.tiny or path.parent.resolve() == RESULTS.resolve() else [RESULTS / path.name])


def result_header(args, mode: Mode, device: torch.device, device_name: str, backends: list[str]) -> dict:
    """The result before any measurement: machine, versions, settings, what each number measures."""
    return {
        "benchmark": "benchmarks/e2e.py", "mode": "tiny" if args.tiny else "gpu", "device": device_name,
        "torch": torch.__version__, "cuda": torch.version.cuda, "cpu_threads": torch.get_num_threads(),
        "device_memory_gib": (torch.cuda.get_device_properties(device).total_memory / 2**30
                              if device.type == "cuda" else None),
        "date": _dt.datetime.now().isoformat(timespec="seconds"), "gspn_backends": backends,
        "settings": {
            "model_px": mode.data["input_size"] * mode.latent_factor, **mode.data,
            "latent_factor": mode.latent_factor, "train": args.train, "resolutions": args.resolutions,
            "sample": args.sample, "sample_steps": mode.sample_steps, "cfg_scale": CFG_SCALE,
            "profile": args.profile, "steps": args.steps, "warmup_steps": mode.warmup,
            "compile_backend": None if args.no_compile else mode.compile_backend,
            "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
            "max_seconds": args.max_seconds if args.max_seconds != float("inf") else None,
        },
        "measured": ("train: GenerationModule's step (diffusion loss, backward, clip_grad_norm 1.0, AdamW, "
                     "LR scheduler, EMA update) on random data, images_per_s over the timed steps after "
                     "warm-up, peak_mem_gib = torch.cuda.max_memory_allocated (weights, grads, AdamW state, "
                     "EMA and activations); compiled: every block torch.compile'd; forward: EMA model, no "
                     "grad, ms_per_image = batch time / forward_batch; sample: DDIM with classifier-free "
                     "guidance to latents, no decoding; profile: self device time per op class; ratios: "
                     "GSPN-XL/2 / DiT-XL/2 (forward: DiT ms / GSPN ms); 'OOM' = out of memory, "
                     "'skipped' = past --max-seconds"),
        "rows": [], "profile": [], "ratios": {},
    }


def run_passes(result: dict, args, mode: Mode, device: torch.device, deadline: float, save) -> str:
    """The eager pass of every preset, the profile after the first two, then the compiled pass; `save()`
    after each step, so a run cut short keeps what it measured. Returns the profile's text tables."""
    profile_text = ""
    gspn_presets = [spec for spec in args.presets if MODELS[parse_preset(spec)[0]]["mixer"] == "gspn"]
    for i, name in enumerate(args.presets):
        result["rows"].append(eager_pass(name, mode, args, device, deadline))
        free_memory()
        save()
        if i == min(1, len(args.presets) - 1) and args.profile and gspn_presets:
            # after the two presets the targets compare, before the rest: a short run keeps the profile
            result["profile"], profile_text = profile_pass(gspn_presets[0], mode, args, device, deadline)
            free_memory()
            save(profile_text)
    if not args.no_compile:
        # the two presets of the targets first: the deadline may leave no time for a third
        order = sorted(result["rows"], key=lambda row: row["preset"] not in ("GSPN-XL/2", "DiT-XL/2"))
        for row in order:
            row["train"] += compiled_pass(row["preset"], mode, args, device, deadline)
            free_memory()
            save()
    return profile_text


def main(argv=None) -> dict:
    args, mode = parse_args(argv)
    deadline = time.perf_counter() + args.max_seconds
    device = torch.device("cpu" if args.tiny else "cuda")
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else cpu_name()
    backends = available_backends()
    if device.type == "cuda" and "cuda" not in backends:
        print("warning: the GSPN CUDA kernels are unavailable, GSPN presets run the PyTorch backend", flush=True)
    result = result_header(args, mode, device, device_name, backends)
    targets = output_paths(args, device_name)

    def save(profile_text: str = "") -> None:
        """JSON and plot of what is measured so far (and the profile's tables when given)."""
        result["ratios"] = ratios(result["rows"])
        for target in targets:
            write_json(target, result)
            plot_forward(result, target.with_suffix(".png"))
            if profile_text:
                write_text(target.with_suffix(".profile.txt"), profile_text)

    profile_text = run_passes(result, args, mode, device, deadline, save)
    print_tables(result)
    written = targets + [p.with_suffix(".png") for p in targets if p.with_suffix(".png").exists()]
    written += [p.with_suffix(".profile.txt") for p in targets if profile_text]
    print("wrote " + ", ".join(str(p) for p in written))
    return result


def _failed(result: dict) -> bool:
    """Whether any measurement failed other than by running out of memory or time."""
    measured = [c for row in result["rows"] for c in row["train"] + row["forward"] + row["sample"]]
    measured += result["profile"]
    return any(isinstance(v, str) and v.startswith("error") for c in measured for v in c.values())


if __name__ == "__main__":
    sys.exit(1 if _failed(main()) else 0)
