"""Benchmark of the GSPN propagation: ``python -m gspn_gen.kernels.bench [--cpu] [--json PATH]``.

GPU mode (default) measures ``gspn_mix`` -- four directions, global scan -- on x (N, C, H, W) with
C = 1152 channels, i.e. 4 x 1152 channel-lines, the official GSPN benchmark's "C = 4 x 1152, four
directions stacked", and gate logits with Cg = C channels (one gate per channel, as the official
kernel) unless --cg says otherwise. For each token grid and dtype (bf16, fp32) it reports forward
(grad enabled, as in training) and backward (gradients of all four inputs) in milliseconds:

  floor      minimal HBM bytes / measured device-to-device copy bandwidth. Forward reads x,
             gate_logits, lam, u and writes y; backward reads those and dy and writes dx,
             d gate_logits, dlam, du (no stored hidden state).
  reference  gspn_mix_reference (pure PyTorch, one set of batched ops per scan step)
  per-column the official code's structure: every direction separately, one round of small
             kernel launches per column (row) step on strided NCHW slices, autograd for backward
  ours       the CuPy CUDA kernels (gspn_mix_cuda); "ours no-grad" is the inference forward
  sdpa       F.scaled_dot_product_attention over the same H*W tokens, 16 heads x 72

Times are means of CUDA-event timings after warm-up. CPU mode (--cpu) times the reference op,
forward and forward + backward, at two small model-like shapes. Results go to a table on stdout
and to JSON naming the device, versions and date (default benchmarks/results/kernels-<device>-<date>.json).
Imports only torch, numpy, the standard library and (GPU mode) CuPy through cupy_backend.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import platform
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from gspn_gen.kernels.reference import gspn_mix_reference

from gspn_gen.fileio import write_json

GPU_SHAPES = [(32, 16, 16), (8, 32, 32), (4, 64, 64), (1, 128, 128), (2, 256, 256)]  # (N, H, W)
CPU_SHAPES = [(64, 96, 24, 8, 8), (8, 192, 48, 32, 32)]  # (N, C, Cg, H, W)
CHANNELS = 1152
HEADS, HEAD_DIM = 16, 72


# ---------------------------------------------------------------------------------------------
# Baselines


def per_column_mix(x, gate_logits, lam, u, chunk=None):
    """gspn_mix in the official code's style: per direction, one round of launches per scan step.

    Same maths as gspn_mix (aligned directions, Stability-Context gates, compact gates expanded to
    C channels as the official kernel takes them), on strided slices of the NCHW maps.
    """
    _, c, height, width = x.shape
    cg = gate_logits.shape[3]
    y = torch.zeros_like(x, dtype=torch.float32)
    for d in range(4):
        col = d < 2
        steps = width if col else height
        line = height if col else width
        sig = torch.sigmoid(gate_logits[:, d].float())  # (N, 3, Cg, H, W)
        exists = torch.ones(3, line, device=x.device)
        exists[0, 0] = 0
        exists[2, -1] = 0
        sig = sig * (exists.view(3, 1, line, 1) if col else exists.view(3, 1, 1, line))
        gates = (sig / sig.sum(1, keepdim=True)).to(x.dtype).repeat_interleave(c // cg, dim=2)
        v = lam[:, d] * x
        order = range(steps) if d % 2 == 0 else range(steps - 1, -1, -1)
        cols, prev = {}, None
        for s in order:
            take = (lambda t, s=s: t[..., s]) if col else (lambda t, s=s: t[..., s, :])  # (..., line)
            restart = prev is None or (chunk is not None and prev // chunk != s // chunk)
            h = take(v)
            if not restart:
                hp = cols[prev]
                g0, g1, g2 = take(gates[:, 0]), take(gates[:, 1]), take(gates[:, 2])
                h = h + g1 * hp
                h = h + F.pad(g0[..., 1:] * hp[..., :-1], (1, 0)) + F.pad(g2[..., :-1] * hp[..., 1:], (0, 1))
            cols[s] = h
            prev = s
        hs = torch.stack([cols[s] for s in range(steps)], dim=-1 if col else -2)
        y = y + u[:, d] * hs
    return y.to(x.dtype)


def _ours():
    from gspn_gen.kernels.cupy_backend import gspn_mix_cuda

    return gspn_mix_cuda


# ---------------------------------------------------------------------------------------------
# Timing


def _cuda_time(fn, warmup: int = 2, budget_s: float = 0.25, max_reps: int = 30) -> float:
    """Mean milliseconds of fn() by CUDA events, after warm-up; rep count sized to ~budget_s."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    first = start.elapsed_time(end)
    reps = int(max(3, min(max_reps, budget_s * 1e3 / max(first, 1e-3))))
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def _cuda_time_backward(forward, warmup: int = 2, budget_s: float = 0.25, max_reps: int = 30) -> float:
    """Mean milliseconds of the backward pass only: forward() returns a closure running backward."""
    def once():
        backward = forward()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        backward()
        end.record()
        return start, end

    for _ in range(warmup):
        once()
    torch.cuda.synchronize()
    s, e = once()
    torch.cuda.synchronize()
    first = s.elapsed_time(e)
    reps = int(max(3, min(max_reps, budget_s * 1e3 / max(first, 1e-3))))
    total = 0.0
    for _ in range(reps):
        s, e = once()
        torch.cuda.synchronize()
        total += s.elapsed_time(e)
    return total / reps


def _cpu_time(fn, budget_s: float = 1.0, max_reps: int = 20) -> float:
    fn()
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    reps = int(max(2, min(max_reps, budget_s / max(first, 1e-6))))
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e3


def copy_bandwidth(nbytes: int = 2**30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = _cuda_time(lambda: dst.copy_(src), warmup=3, budget_s=0.2)
    return 2 * nbytes / (ms * 1e-3)


def mix_bytes(N: int, C: int, Cg: int, H: int, W: int, elem: int) -> tuple[int, int]:
    """Minimal HBM bytes of gspn_mix forward and backward (module docstring)."""
    px = N * H * W
    inputs = (C + 12 * Cg + 4 * C + 4 * C) * px * elem  # x, gate_logits, lam, u
    y = C * px * elem
    return inputs + y, inputs + y + inputs  # backward: inputs + dy read, their gradients written


# ---------------------------------------------------------------------------------------------
# GPU and CPU runs


def _inputs(N, C, Cg, H, W, dtype, device, requires_grad):
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(N, C, H, W, device=device, dtype=dtype, generator=gen)
    logits = torch.randn(N, 4, 3, Cg, H, W, device=device, dtype=dtype, generator=gen)
    lam = torch.rand(N, 4, C, H, W, device=device, dtype=dtype, generator=gen) + 0.5
    u = torch.randn(N, 4, C, H, W, device=device, dtype=dtype, generator=gen)
    return [t.requires_grad_(requires_grad) for t in (x, logits, lam, u)]


def _measure_op(op, inputs, timer_fwd, timer_bwd):
    """(forward ms, backward ms) of op(*inputs) with all inputs requiring grad."""
    dy = torch.randn_like(op(*inputs))

    def fwd():
        return op(*inputs)

    def fwd_then_bwd():
        y = op(*inputs)
        return lambda: torch.autograd.grad(y, inputs, dy)

    return timer_fwd(fwd), timer_bwd(fwd_then_bwd)


def _attention_times(N, H, W, dtype):
    tokens = H * W
    q, k, v = (torch.randn(N, HEADS, tokens, HEAD_DIM, device="cuda", dtype=dtype, requires_grad=True)
               for _ in range(3))

    def op(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    return _measure_op(op, [q, k, v], _cuda_time, _cuda_time_backward)


def _try(fn):
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "oom"


def _gpu_row(N: int, H: int, W: int, dtype: torch.dtype, Cg: int, bandwidth: float, baselines: bool,
             attention: bool) -> dict:
    """One table row: every column's forward and backward ms for one shape and dtype."""
    C = CHANNELS
    fwd_bytes, bwd_bytes = mix_bytes(N, C, Cg, H, W, torch.tensor([], dtype=dtype).element_size())
    row = {"dtype": str(dtype).replace("torch.", ""), "N": N, "H": H, "W": W, "C": C, "Cg": Cg,
           "tokens": H * W, "floor_fwd_ms": fwd_bytes / bandwidth * 1e3, "floor_bwd_ms": bwd_bytes / bandwidth * 1e3}
    ours = _ours()
    inputs = _inputs(N, C, Cg, H, W, dtype, "cuda", requires_grad=True)
    ops = [("ours", ours)]
    if baselines:
        ops += [("reference", gspn_mix_reference), ("per_column", per_column_mix)]
    for name, op in ops:
        times = _try(lambda op=op: _measure_op(op, inputs, _cuda_time, _cuda_time_backward))
        row[f"{name}_fwd_ms"], row[f"{name}_bwd_ms"] = (times, times) if times == "oom" else times
        torch.cuda.empty_cache()
    with torch.no_grad():
        row["ours_nograd_fwd_ms"] = _try(lambda: _cuda_time(lambda: ours(*inputs)))
    inputs.clear()
    torch.cuda.empty_cache()
    if attention:
        times = _try(lambda: _attention_times(N, H, W, dtype))
        row["sdpa_fwd_ms"], row["sdpa_bwd_ms"] = (times, times) if times == "oom" else times
        torch.cuda.empty_cache()
    return row


TUNE_SHAPES = [(4, 64, 64), (1, 128, 128)]
TUNE_CONFIGS = [(128, 48), (256, 48), (256, 96), (512, 48), (512, 96), (1024, 96)]  # (threads, shared KiB)


def tune_ours(bandwidth: float) -> list[dict]:
    """ours (bf16) under other launch settings of cupy_backend: threads per block, shared-memory budget."""
    from gspn_gen.kernels import cupy_backend

    saved = cupy_backend.THREADS, cupy_backend.SMEM_BUDGET
    rows = []
    try:
        for N, H, W in TUNE_SHAPES:
            inputs = _inputs(N, CHANNELS, CHANNELS, H, W, torch.bfloat16, "cuda", requires_grad=True)
            floor_f, floor_b = (b / bandwidth * 1e3 for b in mix_bytes(N, CHANNELS, CHANNELS, H, W, 2))
            for threads, kib in TUNE_CONFIGS:
                cupy_backend.THREADS, cupy_backend.SMEM_BUDGET = threads, kib * 1024
                fwd_plan = cupy_backend._plan(N, CHANNELS, H, W, mix=True, backward=False)
                bwd_plan = cupy_backend._plan(N, CHANNELS, H, W, mix=True, backward=True)
                times = _try(lambda ins=inputs: _measure_op(cupy_backend.gspn_mix_cuda, ins, _cuda_time, _cuda_time_backward))
                row = {"N": N, "H": H, "W": W, "threads": threads, "smem_budget": kib * 1024,
                       "fwd_tiles": [fwd_plan.ts_col, fwd_plan.ts_row], "bwd_tiles": [bwd_plan.ts_col, bwd_plan.ts_row],
                       "fwd_ms": times if times == "oom" else times[0], "bwd_ms": times if times == "oom" else times[1],
                       "floor_fwd_ms": floor_f, "floor_bwd_ms": floor_b}
                rows.append(row)
                print(f"tune bf16 {N}x{H}x{W} threads {threads:4d} smem {kib:3d} KiB tiles fwd {row['fwd_tiles']} "
                      f"bwd {row['bwd_tiles']}: fwd {_fmt(row['fwd_ms'])} bwd {_fmt(row['bwd_ms'])} ms "
                      f"(floor {_fmt(floor_f)} / {_fmt(floor_b)})", flush=True)
            inputs.clear()
            torch.cuda.empty_cache()
    finally:
        cupy_backend.THREADS, cupy_backend.SMEM_BUDGET = saved
    return rows


def run_gpu(args, save) -> dict:
    """The GPU table; save(result) runs after every row, so a run cut short keeps what it measured."""
    import cupy
    from gspn_gen.kernels.cupy_backend import cupy_unavailable_reason

    reason = cupy_unavailable_reason()
    if reason is not None:
        raise SystemExit(f"GPU benchmark needs the CUDA kernels: {reason} (use --cpu for the CPU table)")
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write)")
    result = {
        "benchmark": "gspn_gen.kernels.bench", "mode": "gpu",
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cupy": cupy.__version__, "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "measured": (f"gspn_mix, 4 directions, global scan, x (N, {CHANNELS}, H, W) = 4 x {CHANNELS} channel-lines, "
                     "gate logits (N, 4, 3, Cg, H, W); *_fwd_ms: forward with grad enabled; *_bwd_ms: backward "
                     "only (grads of x, gate_logits, lam, u); floor: minimal HBM bytes / copy bandwidth; "
                     f"sdpa: scaled_dot_product_attention on H*W tokens, {HEADS} heads x {HEAD_DIM}; "
                     "mean CUDA-event ms after warm-up; 'oom' = out of memory, absent = skipped as too slow"),
        "rows": [],
        "tuning": [],
    }
    for dtype in (torch.bfloat16, torch.float32):
        for N, H, W in args.shapes:
            small = H * W <= args.max_baseline_tokens
            row = _gpu_row(N, H, W, dtype, args.cg or CHANNELS, bandwidth, baselines=small,
                           attention=small or dtype != torch.float32)
            result["rows"].append(row)
            _print_gpu_row(row, header=len(result["rows"]) == 1)
            save(result)
    if args.tune:
        result["tuning"] = tune_ours(bandwidth)
        save(result)
    return result


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def _print_gpu_row(row: dict, header: bool) -> None:
    cols = ["floor", "reference", "per_column", "ours", "sdpa"]
    if header:
        print(f"{'dtype':9} {'N x H x W':>12} " + " ".join(f"{c + ' fwd/bwd':>21}" for c in cols)
              + f" {'ours/floor':>11}")
    shape = f"{row['N']}x{row['H']}x{row['W']}"
    cells = [f"{_fmt(row.get(c + '_fwd_ms')):>10}/{_fmt(row.get(c + '_bwd_ms')):<10}" for c in cols]
    ratio = "-"
    if isinstance(row.get("ours_fwd_ms"), float):
        ratio = f"{row['ours_fwd_ms'] / row['floor_fwd_ms']:.1f}/{row['ours_bwd_ms'] / row['floor_bwd_ms']:.1f}"
    print(f"{row['dtype']:9} {shape:>12} " + " ".join(cells) + f" {ratio:>11}", flush=True)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_row(N: int, C: int, Cg: int, H: int, W: int) -> dict:
    inputs = _inputs(N, C, Cg, H, W, torch.float32, "cpu", requires_grad=True)
    dy = torch.randn(N, C, H, W)
    with torch.no_grad():
        fwd = _cpu_time(lambda: gspn_mix_reference(*inputs))
    both = _cpu_time(lambda: torch.autograd.grad(gspn_mix_reference(*inputs), inputs, dy))
    return {"dtype": "float32", "N": N, "C": C, "Cg": Cg, "H": H, "W": W,
            "reference_fwd_ms": fwd, "reference_fwd_bwd_ms": both}


def run_cpu(args) -> dict:
    print(f"{_cpu_name()}, {torch.get_num_threads()} threads")
    print(f"{'N x C x H x W':>18} {'Cg':>4} {'fwd ms':>10} {'fwd+bwd ms':>11}")
    rows = []
    for N, C, Cg, H, W in CPU_SHAPES:
        rows.append(_cpu_row(N, C, Cg, H, W))
        print(f"{f'{N}x{C}x{H}x{W}':>18} {Cg:>4} {_fmt(rows[-1]['reference_fwd_ms']):>10} "
              f"{_fmt(rows[-1]['reference_fwd_bwd_ms']):>11}", flush=True)
    return {
        "benchmark": "gspn_gen.kernels.bench", "mode": "cpu", "device": _cpu_name(),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "measured": ("gspn_mix_reference, 4 directions, global scan, float32; reference_fwd_ms: forward "
                     "under no_grad; reference_fwd_bwd_ms: forward + backward of all four inputs; mean ms"),
        "rows": rows,
    }


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _shape(text: str) -> tuple[int, int, int]:
    parts = [int(p) for p in text.lower().split("x")]
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"shape must be NxHxW with positive sizes, got {text!r}")
    return tuple(parts)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m gspn_gen.kernels.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="time the reference op on the CPU instead")
    parser.add_argument("--json", type=Path, default=None, help="output JSON path")
    parser.add_argument("--shapes", type=_shape, nargs="+", default=GPU_SHAPES, help="GPU shapes NxHxW")
    parser.add_argument("--cg", type=int, default=None, help=f"gate channels (default C = {CHANNELS})")
    parser.add_argument("--max-baseline-tokens", type=int, default=128 * 128,
                        help="skip the reference and per-column baselines above this many tokens")
    parser.add_argument("--tune", action="store_true",
                        help="also time ours (bf16) under other threads-per-block / shared-memory settings")
    args = parser.parse_args(argv)
    if args.cg is not None and (args.cg < 1 or CHANNELS % args.cg):
        parser.error(f"--cg must divide {CHANNELS}, got {args.cg}")
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA device is visible to PyTorch; use --cpu for the CPU table")
    device = _cpu_name() if args.cpu else torch.cuda.get_device_name()
    path = args.json or Path("benchmarks/results") / f"kernels-{_slug(device)}-{_dt.date.today().isoformat()}.json"
    result = run_cpu(args) if args.cpu else run_gpu(args, save=lambda r: write_json(path, r))
    write_json(path, result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
