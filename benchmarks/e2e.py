"""End-to-end benchmark of the generators (DESIGN.md §9): parameters, training speed and memory, forward time.

    python benchmarks/e2e.py [--presets GSPN-XL/2 GSPN-paper-XL/2 DiT-XL/2] [--batch-sizes 16 32]
                             [--resolutions 256 512 1024 2048] [--steps 10] [--json PATH]
                             [--profile] [--max-seconds S] [--tiny]

For each preset:
- params: every parameter of the backbone (`zoo.count_params`, DiT's convention: DiT-XL/2 = 675.1M);
- training at 256 px (SD-VAE latents 4x32x32, 1000 classes), per batch size: images/s and peak
  `torch.cuda.max_memory_allocated` of the real training step of `GenerationModule`, done as Lightning
  does it with precision "bf16-mixed" and gradient_clip_val 1.0: diffusion loss under bf16 autocast,
  backward, grad-norm clipping, fused AdamW step, LR-scheduler step, EMA update. Weights, gradients,
  optimizer state and the EMA copy all live on the GPU, as in training;
- forward per image (no grad, EMA weights, bf16 autocast) at each resolution, latents px / 8, on batches
  holding as many latent pixels as the first training batch, at least one image (16 / 4 / 1 / 1 images
  at 256 / 512 / 1024 / 2048 px by default). The model built for 32x32 latents takes any size: the
  backbone derives its token grid from the input.
Times: CUDA events after warm-up on a GPU, perf_counter on the CPU. Out of memory is reported as "OOM",
a measurement past --max-seconds as "skipped", any other failure as "error: ..." (exit status 1).
--tiny runs on the CPU in seconds (tests/test_e2e_bench.py): GSPN-T/2 and DiT-T/2 built for 1x16x16
pixels and 10 classes, batch 4, forward at 16 and 32 px in pixel space (no VAE factor), 2 steps, fp32.
Prints tables and writes JSON naming device, versions and date, after every preset so a run cut short
keeps what it measured: to --json (a file, or a folder for the default name), by default
benchmarks/results/e2e-<device>-<date>.json (--tiny: a temp dir).
--profile adds a torch.profiler summary of one training step per preset (top ops by self device time
and by self memory) next to the JSON as <json stem>.profile.txt.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import os
import sys
import tempfile
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from gspn_gen.kernels import available_backends
from gspn_gen.kernels.report import cpu_name, slug

from gspn_gen.fileio import write_json
from gspn_gen.lit import GenerationModule
from gspn_gen.models.zoo import MODELS, count_params

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Mode:
    """Defaults of a run: what the models are built for and what is measured."""

    presets: list[str]
    batch_sizes: list[int]
    resolutions: list[int]                   # image side in px
    steps: int                               # timed training steps; most forward reps
    warmup: int                              # untimed training steps first
    latent_factor: int                       # px per latent pixel (SD VAE: 8)
    data: dict                               # GenerationModule's num_classes, in_channels, input_size


GPU = Mode(["GSPN-XL/2", "GSPN-paper-XL/2", "DiT-XL/2"], [16, 32], [256, 512, 1024, 2048], steps=10,
           warmup=3, latent_factor=8, data={"num_classes": 1000, "in_channels": 4, "input_size": 32})
TINY = Mode(["GSPN-T/2", "DiT-T/2"], [4], [16, 32], steps=2, warmup=1, latent_factor=1,
            data={"num_classes": 10, "in_channels": 1, "input_size": 16})
FORWARD_BUDGET_S = 2.0  # timed forward calls per cell: as many as fit in this, judged by the first (1..steps)


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


def train_step(module: GenerationModule, opt, sched, batch: int, mode: Mode, device: torch.device):
    """One optimisation step on a random batch, in Lightning's order (module docstring)."""
    size, channels = mode.data["input_size"], mode.data["in_channels"]
    x = torch.randn(batch, channels, size, size, device=device)                   # (B, C, H, W)
    y = torch.randint(0, mode.data["num_classes"], (batch,), device=device)       # (B,)
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


def measure_forward(ema: torch.nn.Module, px: int, mode: Mode, max_reps: int, device: torch.device) -> dict:
    latent = px // mode.latent_factor
    batch = max(1, mode.batch_sizes[0] * mode.data["input_size"] ** 2 // latent**2)
    x = torch.randn(batch, mode.data["in_channels"], latent, latent, device=device)  # (B, C, h, w)
    t = torch.randint(0, 1000, (batch,), device=device).float()                      # (B,)
    y = torch.randint(0, mode.data["num_classes"], (batch,), device=device)          # (B,)

    def forward() -> None:
        with torch.no_grad(), autocast(device):
            ema(x, t, y)

    forward()  # warm-up: kernel compilation, allocator growth
    first = timed(forward, 1, device)
    reps = max(1, min(max_reps, int(FORWARD_BUDGET_S / max(first, 1e-6))))
    seconds = first + (timed(forward, reps - 1, device) if reps > 1 else 0.0)
    return {"forward_batch": batch, "ms_per_image": seconds / reps / batch * 1e3}


def profile_table(step, device: torch.device) -> str:
    """torch.profiler summary of one call of step(): top ops by self device time, then by self memory."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, profile_memory=True) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    kind = "device" if cuda else "cpu"
    return (f"-- top ops by self {kind} time\n" + events.table(sort_by=f"self_{kind}_time_total", row_limit=25)
            + f"\n-- top ops by self {kind} memory\n"
            + events.table(sort_by=f"self_{kind}_memory_usage", row_limit=15))


def build_module(name: str, mode: Mode, device: torch.device) -> GenerationModule:
    """The training module as the CLI builds it (constant LR: the cosine schedule needs a trainer)."""
    with torch.device(device):  # weights initialised in place: no slow CPU init of a 700M model
        module = GenerationModule(model=name, **mode.data, lr=1e-4, lr_schedule="constant",
                                  fused_adamw=device.type == "cuda")
    module.to(device)  # records the device on the LightningModule; the tensors are there already
    module.model.train()
    return module


def bench_preset(name: str, mode: Mode, args, device: torch.device, deadline: float) -> tuple[dict, str]:
    """One result row (params, train cells, forward cells) and its profile text ("" without --profile)."""
    train_keys, forward_keys = ["images_per_s", "step_ms", "peak_mem_gib"], ["forward_batch", "ms_per_image"]
    module = attempt(deadline, build_module, name, mode, device)
    if isinstance(module, str):  # not even built: every cell carries why
        print(f"{name}: {module}", flush=True)
        return {"preset": name, "params": None,
                "train": [{"batch_size": b, **cells(module, train_keys)} for b in args.batch_sizes],
                "forward": [{"px": px, "latent": px // mode.latent_factor, **cells(module, forward_keys)}
                            for px in args.resolutions]}, ""
    optim = module.configure_optimizers()
    opt, sched = optim["optimizer"], optim["lr_scheduler"]["scheduler"]
    row = {"preset": name, "params": count_params(module.model), "train": [], "forward": []}
    print(f"{name}: {row['params'] / 1e6:.1f}M parameters", flush=True)

    profile_text = ""
    for batch in args.batch_sizes:
        step = train_step(module, opt, sched, batch, mode, device)
        result = cells(attempt(deadline, measure_train, step, batch, mode, args.steps, device), train_keys)
        row["train"].append({"batch_size": batch, **result})
        print(f"  train batch {batch}: {_fmt(result['images_per_s'])} img/s, "
              f"peak {_fmt(result['peak_mem_gib'])} GiB", flush=True)
        if args.profile and not profile_text and isinstance(result["images_per_s"], float):
            text = attempt(deadline, profile_table, step, device)
            profile_text = f"== {name}, one training step, batch {batch}\n{text}\n"
        step = None  # frees this batch's inputs before the next
        opt.zero_grad(set_to_none=True)
        free_memory()

    for px in args.resolutions:
        result = cells(attempt(deadline, measure_forward, module.ema, px, mode, args.steps, device), forward_keys)
        row["forward"].append({"px": px, "latent": px // mode.latent_factor, **result})
        print(f"  forward {px} px: {_fmt(result['ms_per_image'])} ms/image", flush=True)
        free_memory()

    module = opt = sched = optim = None
    free_memory()
    return row, profile_text


# ---------------------------------------------------------------------------------------------
# Output


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v if len(v) <= 9 else v[:8] + "~"
    return f"{v:.2f}" if v < 100 else f"{v:.0f}"


def print_tables(result: dict) -> None:
    rows, s = result["rows"], result["settings"]
    print(f"\n{result['device']}, torch {result['torch']}, gspn backends {result['gspn_backends']}")
    print(f"training at {s['train_px']} px (model input {s['in_channels']}x{s['train_size']}x{s['train_size']}, "
          f"{s['num_classes']} classes), {s['precision']}: images/s and peak GiB per batch size")
    print(f"{'preset':<18} {'params (M)':>10} " + " ".join(f"{f'b={b} img/s':>11} {'GiB':>7}"
                                                       for b in s["batch_sizes"]))
    for row in rows:
        train = " ".join(f"{_fmt(c['images_per_s']):>11} {_fmt(c['peak_mem_gib']):>7}" for c in row["train"])
        params = "-" if row["params"] is None else f"{row['params'] / 1e6:.1f}"
        print(f"{row['preset']:<18} {params:>10} {train}")
    print(f"forward per image (ms), EMA weights, no grad, {s['precision']}")
    print(f"{'preset':<18} " + " ".join(f"{f'{px} px':>9}" for px in s["resolutions"]))
    for row in rows:
        print(f"{row['preset']:<18} " + " ".join(f"{_fmt(c['ms_per_image']):>9}" for c in row["forward"]))


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python benchmarks/e2e.py", description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", help=f"model presets (default {' '.join(GPU.presets)})")
    parser.add_argument("--batch-sizes", nargs="+", type=_positive_int, help="training batch sizes (default 16 32)")
    parser.add_argument("--resolutions", nargs="+", type=_positive_int,
                        help="forward image sides in px (default 256 512 1024 2048)")
    parser.add_argument("--steps", type=_positive_int, help="timed training steps, most forward reps (default 10)")
    parser.add_argument("--json", type=Path,
                        help="output JSON path, or an existing folder for the default name e2e-<device>-<date>.json")
    parser.add_argument("--profile", action="store_true", help="torch.profiler summary of one training step")
    parser.add_argument("--max-seconds", type=float, default=float("inf"),
                        help="measurements starting after this many seconds are reported as 'skipped'")
    parser.add_argument("--tiny", action="store_true", help="tiny presets on the CPU, in seconds")
    args = parser.parse_args(argv)
    mode = TINY if args.tiny else GPU
    for key in ("presets", "batch_sizes", "resolutions", "steps"):
        if getattr(args, key) is None:
            setattr(args, key, getattr(mode, key))
    unknown = [name for name in args.presets if name not in MODELS]
    if unknown:
        parser.error(f"unknown preset(s) {unknown}; known: {', '.join(MODELS)}")
    bad = [px for px in args.resolutions if px % mode.latent_factor]
    if bad:
        parser.error(f"resolutions must be multiples of {mode.latent_factor} px (the latent factor), got {bad}")
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("no CUDA device is visible to PyTorch; use --tiny for the CPU run")

    deadline = time.perf_counter() + args.max_seconds
    device = torch.device("cpu" if args.tiny else "cuda")
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else cpu_name()
    date = _dt.date.today().isoformat()
    default_dir = Path(tempfile.mkdtemp(prefix="e2e-")) if args.tiny else RESULTS
    default_name = f"e2e-{slug(device_name)}-{date}.json"
    if args.json is not None and args.json.is_dir():
        path = args.json / default_name
    else:
        path = args.json or default_dir / default_name
    backends = available_backends()
    if device.type == "cuda" and "cuda" not in backends:
        print("warning: the GSPN CUDA kernels are unavailable, GSPN presets run the reference op", flush=True)
    result = {
        "benchmark": "benchmarks/e2e.py", "mode": "tiny" if args.tiny else "gpu", "device": device_name,
        "torch": torch.__version__, "cuda": torch.version.cuda, "cpu_threads": torch.get_num_threads(),
        "device_memory_gib": (torch.cuda.get_device_properties(device).total_memory / 2**30
                              if device.type == "cuda" else None),
        "date": _dt.datetime.now().isoformat(timespec="seconds"), "gspn_backends": backends,
        "settings": {
            "train_px": mode.data["input_size"] * mode.latent_factor, "train_size": mode.data["input_size"],
            **mode.data, "latent_factor": mode.latent_factor, "batch_sizes": args.batch_sizes,
            "resolutions": args.resolutions, "steps": args.steps, "warmup_steps": mode.warmup,
            "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        },
        "measured": ("train: GenerationModule's step (diffusion loss, backward, clip_grad_norm 1.0, AdamW, "
                     "LR scheduler, EMA update) on random data, images_per_s over the timed steps after "
                     "warm-up, peak_mem_gib = torch.cuda.max_memory_allocated (weights, grads, AdamW state, "
                     "EMA and activations); forward: EMA model, no grad, ms_per_image = batch time / "
                     "forward_batch; 'OOM' = out of memory, 'skipped' = past --max-seconds"),
        "rows": [],
    }
    profiles = []
    for name in args.presets:
        row, profile_text = bench_preset(name, mode, args, device, deadline)
        result["rows"].append(row)
        profiles.append(profile_text)
        write_json(path, result)
    print_tables(result)
    print(f"wrote {path}")
    if args.profile:
        profile_path = path.with_suffix(".profile.txt")
        tmp = profile_path.with_name(profile_path.name + ".tmp")
        tmp.write_text("\n".join(profiles))
        os.replace(tmp, profile_path)
        print(f"wrote {profile_path}")
    return result


def _failed(result: dict) -> bool:
    """Whether any measurement failed other than by running out of memory or time."""
    measured = [c for row in result["rows"] for c in row["train"] + row["forward"]]
    return any(isinstance(v, str) and v.startswith("error") for c in measured for v in c.values())


if __name__ == "__main__":
    sys.exit(1 if _failed(main()) else 0)
