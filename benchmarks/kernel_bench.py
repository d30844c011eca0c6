"""Benchmark of the GSPN propagation kernels: ``python benchmarks/kernel_bench.py [--plans] [--bytes] [--tune] [--device cpu]``.

Measures ``gspn_mix`` (four directions, global scan) on x (N, C, H, W) with C = 1152 channels -- the
official GSPN benchmark's "C = 4 x 1152, four directions stacked" -- and gate logits with Cg = C
(one gate per channel) unless --cg says otherwise.

--plans (no GPU needed; ``kernel_plans.py``): the design figures of every plan per architecture (sm_80,
sm_89, sm_90), target shape and variant -- threads, CTAs, registers (ptxas), shared memory, CTAs per SM,
bytes in flight per SM, bytes by design / floor, modelled fraction of the copy bandwidth -- written to
benchmarks/results/kernels-plans.json.

--bytes (no GPU needed): per shape, the global-memory bytes the kernels move by construction
(``cuda_plan.mix_traffic``: every load and store the launch plan issues; the CPU emulation checks it
counts the same) next to the floor (each input read once, each output written once), and the launch
plans with their shared memory.

GPU (default): per shape and dtype, in milliseconds (median of CUDA-event timings after warm-up):
  floor       floor bytes / the device-to-device copy bandwidth measured in the same run
  ours        the CUDA kernels in each variant the device runs (cluster: sm_90; portable: sm_80+), forward
              and backward (all four gradients); "of copy bw" = bytes moved by design (through DRAM) /
              time / copy bandwidth, next to the design model's prediction for the same plan
  per-column  the official code's structure: each direction separately, one round of small launches
              per scan step on strided NCHW slices, autograd for backward (fwd + bwd)
  sdpa        F.scaled_dot_product_attention on the same H * W tokens, 16 heads x 72 (fwd + bwd)
and a PNG plot of fwd + bwd ms against tokens (ours per variant, per-column, SDPA, floor). --tune also sweeps
the kernels' launch settings. Results: a table on stdout and JSON (device, versions, date) plus the
plot in benchmarks/results/ unless --json says where; the JSON is rewritten after every row, so a run
cut short keeps what it measured. Exit status 1 when any cell failed (an error or out of memory).

--device cpu: side by side in one run on this machine's CPU, N = 1, C = 384, fp32, torch's thread count,
at 16², 32², 64², 128² tokens, best wall-clock ms of forward and forward + backward of
  ours        gspn_mix on the compiled CPU kernel (kernels/cpu)
  torch       gspn_mix on the pure-PyTorch backend
  sdpa        F.scaled_dot_product_attention on the same tokens, 6 heads x 64
  floor       the larger of the bytes by design / the copy bandwidth measured in the same run, and the
              arithmetic (12 sigmoids and 12 multiply-adds per channel-pixel forward; 24 and 48 forward
              + backward) at the throughput of torch's sigmoid and addcmul on cache-resident tensors,
              measured in the same run
and a log-log plot of ms against tokens (`kernels-cpu-<cpu>-<date>.json` and `.png`).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import functools
import itertools
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from gspn_gen.kernels import cuda_plan, cupy_backend, gspn_mix
from gspn_gen.kernels.cuda_plan import Launch
from gspn_gen.kernels.testing import copy_bandwidth, mix_inputs, time_ms

from gspn_gen.fileio import write_json
from gspn_gen.report import cpu_name, log_log_plot, machine, slug

RESULTS = Path(__file__).resolve().parent / "results"

CHANNELS = 1152
HEADS, HEAD_DIM = 16, 72
TARGETS = [(32, 16, 16), (8, 32, 32), (4, 64, 64), (1, 128, 128)]   # (N, H, W), bf16
EXTRA = [(4, 64, 64, torch.float32)]                                # and fp32 at 64 x 64
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TUNE_GRID = {"loaders": (64, 128, 256), "scan_lanes": (64, 128), "tile": (8, 16), "smem": (None, 113 * 1024),
             "lookahead": (None, 0)}


# ---------------------------------------------------------------------------------------------
# Bytes by design (CPU)


def _with_smem(smem_limit: int) -> cuda_plan.Device:
    """An H100's limits with `smem_limit` bytes of shared memory per block."""
    return dataclasses.replace(cuda_plan.ARCHS["sm_90"], smem_block=smem_limit)


def bytes_rows(shapes, C: int, Cg: int, smem_limit: int) -> list[dict]:
    """Design bytes vs floor and the plans, per (N, H, W, dtype)."""
    rows = []
    for N, H, W, dtype in shapes:
        t = cuda_plan.mix_traffic(N, C, Cg, H, W, dtype, device=_with_smem(smem_limit))
        cpx = N * C * H * W
        row = {"dtype": _name(dtype), "N": N, "H": H, "W": W, "C": C, "Cg": Cg,
               "floor_fwd_B_per_Cpx": t["floor_fwd"] / cpx, "floor_bwd_B_per_Cpx": t["floor_bwd"] / cpx}
        for key in ("fwd", "bwd"):
            row[f"design_{key}_B_per_Cpx"] = None if t[key] is None else t[key] / cpx
            row[f"design_{key}_x_floor"] = None if t[key] is None else t[key] / t[f"floor_{key}"]
            row[f"plan_{key}"] = t.get(f"plan_{key}")
        rows.append(row)
    return rows


def limit_rows(smem_limit: int) -> list[dict]:
    """Per dtype, the largest square map (side a multiple of 8) whose forward and backward plans fit."""
    return [{"dtype": name, "largest_square_side": cuda_plan.largest_square(dtype, _with_smem(smem_limit)),
             "smem_limit": smem_limit, "max_line": cuda_plan.MAX_LINE} for name, dtype in DTYPES.items()]


def print_bytes(rows: list[dict], limits: list[dict]) -> None:
    print("bytes per C*pixel moved by design vs the floor (each input read once, each output written once)")
    print(f"{'dtype':6} {'N x H x W':>11} {'floor fwd':>9} {'design':>7} {'x':>6} {'floor bwd':>9} {'design':>7} "
          f"{'x':>6}   plan fwd / bwd (planes per CTA, warps per line, tile, vector, threads, smem KiB)")
    for r in rows:
        cells = []
        for key in ("fwd", "bwd"):
            d, x = r[f"design_{key}_B_per_Cpx"], r[f"design_{key}_x_floor"]
            cells.append(f"{r[f'floor_{key}_B_per_Cpx']:9.1f} {_fmt(d):>7} {_fmt(x, 3):>6}")
        plans = " / ".join("-" if p is None else
                           f"{p['planes_per_cta']}, {p['line_warps']}, {p['tile']}, {p['vector']}, {p['threads']}, "
                           f"{p['smem'] / 1024:.1f}"
                           for p in (r["plan_fwd"], r["plan_bwd"]))
        shape = f"{r['N']}x{r['H']}x{r['W']}"
        print(f"{r['dtype']:6} {shape:>11} {cells[0]} {cells[1]}   {plans}")
    print(f"largest square maps within {limits[0]['smem_limit']} bytes of shared memory per block "
          f"(lines of at most {limits[0]['max_line']}): "
          + ", ".join(f"{r['dtype']} {r['largest_square_side']}^2" for r in limits))


# ---------------------------------------------------------------------------------------------
# Design figures (--plans, CPU): every plan per architecture, target shape and variant. Registers per
# thread from ptxas through NVRTC for that architecture (the planner's assumption where NVRTC is not
# installed); the figures from cuda_plan.design. A GPU run measures the same cells and the model is
# corrected where it was wrong.

PLAN_ARCHS = ("sm_80", "sm_89", "sm_90")   # A100, L40S, H100
PLAN_SHAPES = [(*s, torch.bfloat16) for s in TARGETS] + EXTRA


def _kernel(variant: str, backward: bool) -> str:
    return cupy_backend._MIX_KERNELS[variant][int(backward)]


def _variants(arch: str) -> tuple[str, ...]:
    return cuda_plan.VARIANTS if cuda_plan.ARCHS[arch].sm >= 90 else ("portable",)


def registers(archs=PLAN_ARCHS, shapes=PLAN_SHAPES) -> tuple[dict, str | None]:
    """({(arch, kernel name): ptxas report}, None) for every gspn_mix kernel the target rows can use, all
    R values (the planner needs them), compiled by NVRTC one program per architecture in parallel threads;
    ({}, reason) when NVRTC is not available."""
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as err:  # noqa: BLE001  (CuPy missing, or its NVRTC library not found)
        return {}, f"NVRTC is not available ({str(err).strip().splitlines()[0]}): registers are the planner's assumption"
    jobs = {}
    for arch in archs:
        names = sorted({cupy_backend.kernel_name(_kernel(v, bwd), dtype, R)
                        for v in _variants(arch) for _, _, _, dtype in shapes for bwd in (False, True)
                        for R in cuda_plan.R_VALUES})
        jobs[arch] = names

    def build(arch):
        return arch, cupy_backend.ptxas_report(cuda_plan.ARCHS[arch].sm, jobs[arch])

    out = {}
    with ThreadPoolExecutor(len(jobs)) as pool:
        for arch, report in pool.map(build, jobs):
            report.pop("_log", None)
            out.update({(arch, name): r for name, r in report.items()})
    return out, None


def plan_rows(regs: dict, archs=PLAN_ARCHS, shapes=PLAN_SHAPES) -> list[dict]:
    """One row per architecture, shape, variant and pass with the design figures (None figures: no plan,
    the op falls to the PyTorch backend for that shape when it needs that pass)."""
    rows = []
    for arch in archs:
        device = cuda_plan.ARCHS[arch]
        for N, H, W, dtype in shapes:
            for variant in _variants(arch):
                for backward in (False, True):
                    names = [cupy_backend.kernel_name(_kernel(variant, backward), dtype, R) for R in cuda_plan.R_VALUES]
                    reports = [regs.get((arch, n)) for n in names]
                    reg_tuple = tuple(r["registers"] for r in reports) if all(reports) else None
                    d = cuda_plan.design(N, CHANNELS, CHANNELS, H, W, dtype, backward, variant, device,
                                           reg_tuple)
                    row = {"arch": arch, "device": device.name, "N": N, "H": H, "W": W, "C": CHANNELS,
                           "dtype": _name(dtype), "variant": variant, "pass": "bwd" if backward else "fwd",
                           "registers_from": "ptxas" if reg_tuple else "assumed", "design": d}
                    if d is not None and reg_tuple:
                        report = reports[cuda_plan.R_VALUES.index(d["plan"]["R"])]
                        row["spills"] = report["spill_stores"] + report["spill_loads"] + report["stack"]
                    rows.append(row)
    return rows


def print_plans(rows: list[dict]) -> None:
    print(f"{'arch':5} {'N x H x W':>11} {'dtype':5} {'variant':8} {'pass':4} {'thr':>4} {'CTAs':>6} {'regs':>4} "
          f"{'smem KB':>7} {'CTA/SM':>12} {'in flight/needed KB':>19} {'bytes/fl':>8} {'DRAM/fl':>7} {'model':>6} bound")
    for r in rows:
        d = r["design"]
        head = f"{r['arch']:5} {r['N']:>3}x{r['H']}x{r['W']:<4} {r['dtype']:5} {r['variant']:8} {r['pass']:4}"
        if d is None:
            print(f"{head} no plan within {cuda_plan.ARCHS[r['arch']].smem_block // 1024} KB of shared memory "
                  "per block: the PyTorch backend runs this pass")
            continue
        regs = f"{d['regs']}" + ("" if r["registers_from"] == "ptxas" else "*")
        flight = " ".join(f"{f // 1024}/{n // 1024}" for f, n in zip(d["inflight_sm_by_phase"],
                                                                    d.get("needed_sm_by_phase", [0] * 2)))
        print(f"{head} {d['threads']:>4} {d['ctas']:>6} {regs:>4} {d['smem'] / 1024:>7.1f} "
              f"{d['ctas_per_sm']:>2} ({d['ctas_per_sm_limit']:9}) {flight:>19} "
              f"{d['bytes_x_floor']:>8.3f} {d['dram_x_floor']:>7.3f} {100 * d.get('modelled_of_copy_bw', 0):>5.0f}% "
              f"{d.get('bound', '-')}")


def main_plans(path) -> dict:
    """Print the plans table and write it (with the model's constants and the device table) to `path`. In
    flight / needed: per phase (forward; backward pass 1 and pass 2), the load bytes in flight per SM by
    design and what Little's law needs for the phase's share of loads at the copy bandwidth."""
    regs, note = registers()
    rows = plan_rows(regs)
    print_plans(rows)
    if note:
        print(f"* {note}")
    result = {"benchmark": "benchmarks/kernel_bench.py", "mode": "plans", "machine": machine(),
              "registers": note or "ptxas (NVRTC) for each architecture",
              "devices": {arch: dataclasses.asdict(cuda_plan.ARCHS[arch]) for arch in PLAN_ARCHS},
              "model": {"instr_per_position": {f"{k[0]} {k[1]}": v for k, v in cuda_plan.INSTR_PER_POSITION.items()},
                        "load_instr_per_byte": cuda_plan.LOAD_INSTR_PER_BYTE,
                        "store_instr_per_byte": cuda_plan.STORE_INSTR_PER_BYTE,
                        "step_latency_cycles": cuda_plan.STEP_LATENCY_CYCLES,
                        "dram_latency_s": cuda_plan.DRAM_LATENCY_S, "launch_overhead_s": cuda_plan.LAUNCH_OVERHEAD_S,
                        "lanes_sm_target": cuda_plan.LANES_SM, "inflight_sm_target": cuda_plan.INFLIGHT_SM},
              "measured": ("design figures, no measurement: threads and CTAs of the launch, registers per thread, "
                           "shared memory per CTA, CTAs per SM and their limiter, load bytes in flight per SM, "
                           "bytes by design / floor (bytes_x_floor; dram_x_floor without the portable sum's L2 "
                           "re-reads), modelled time and fraction of the copy bandwidth (cuda_plan.design)"),
              "rows": rows}
    write_json(path, result)
    print(f"wrote {path}")
    return result


# ---------------------------------------------------------------------------------------------
# Baseline


def per_column_mix(x, gate_logits, lam, u, chunk=None):
    """gspn_mix in the official code's style: per direction, one round of launches per scan step.

    Same maths as gspn_mix (aligned directions, Stability-Context gates, compact gates expanded to C
    channels as the official kernel takes them), on strided slices of the NCHW maps.
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


# ---------------------------------------------------------------------------------------------
# GPU timing


def _inputs(N, C, Cg, H, W, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(N, C, H, W, device="cuda", dtype=dtype, generator=gen)
    logits = 2 * torch.randn(N, 4, 3, Cg, H, W, device="cuda", dtype=dtype, generator=gen)
    lam = 0.5 + torch.rand(N, 4, C, H, W, device="cuda", dtype=dtype, generator=gen)
    u = torch.randn(N, 4, C, H, W, device="cuda", dtype=dtype, generator=gen)
    dy = torch.randn(N, C, H, W, device="cuda", dtype=dtype, generator=gen)
    return [x, logits, lam, u], dy


def _fwd_bwd_ms(op, inputs, dy) -> float:
    leaves = [t.detach().requires_grad_() for t in inputs]
    return time_ms(lambda: torch.autograd.grad(op(*leaves), leaves, dy), budget_s=0.5, max_reps=10)


def sdpa_ms(N: int, tokens: int, dtype) -> float:
    """fwd + bwd ms of scaled_dot_product_attention (flash on H100/H200) on N x tokens, HEADS x HEAD_DIM."""
    qkv = [torch.randn(N, HEADS, tokens, HEAD_DIM, device="cuda", dtype=dtype) for _ in range(3)]
    return _fwd_bwd_ms(F.scaled_dot_product_attention, qkv, torch.randn_like(qkv[0]))


def _attempt(fn):
    """fn(), or 'oom' / the error's first line: one failed column never stops the table."""
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "oom"
    except Exception as err:  # noqa: BLE001  (a launch error in one configuration is a result to report)
        return f"error: {str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}"


def _design(N, H, W, dtype, Cg, variant: str, backward: bool, launch: Launch, bandwidth: float) -> dict | None:
    """The design model's figures for the plan this device runs (its limits, its kernels' registers, the
    copy bandwidth measured in this run, the clock of its architecture's card in cuda_plan.ARCHS)."""
    index = torch.cuda.current_device()
    limits = cupy_backend._device_limits(index)
    card = cuda_plan.ARCHS.get(f"sm_{limits.sm}", cuda_plan.ARCHS["sm_90"])
    device = dataclasses.replace(limits, copy_bw=bandwidth, clock_ghz=card.clock_ghz)
    try:
        kernels = cupy_backend._kernels(index, variant)
        regs = tuple(kernels[cupy_backend.kernel_name(_kernel(variant, backward), dtype, R)].num_regs
                     for R in cuda_plan.R_VALUES)
    except Exception:  # noqa: BLE001  (the measurement reports the failure; the design then has no registers)
        regs = None
    return cuda_plan.design(N, CHANNELS, Cg, H, W, dtype, backward, variant, device, regs, launch)


def gpu_row(N, H, W, dtype, Cg, bandwidth, baselines: bool, launch: Launch, variants) -> dict:
    """One table row: floor; per variant ours fwd / bwd next to the design; per-column and SDPA fwd + bwd."""
    C = CHANNELS
    t = cuda_plan.mix_traffic(N, C, Cg, H, W, dtype, launch=launch)
    row = {"dtype": _name(dtype), "N": N, "H": H, "W": W, "C": C, "Cg": Cg, "tokens": H * W,
           "floor_fwd_ms": t["floor_fwd"] / bandwidth * 1e3, "floor_bwd_ms": t["floor_bwd"] / bandwidth * 1e3,
           "variants": {}}
    inputs, dy = _inputs(N, C, Cg, H, W, dtype)
    for variant in variants:
        cell = {}
        for key, backward in (("fwd", False), ("bwd", True)):
            if backward:
                fn = functools.partial(cupy_backend.mix_backward, dy, *inputs, None, (True,) * 4, launch, variant)
            else:
                fn = functools.partial(cupy_backend.mix_forward, *inputs, None, launch, variant)
            design = _attempt(functools.partial(_design, N, H, W, dtype, Cg, variant, backward, launch, bandwidth))
            cell[f"design_{key}"] = design
            ms = cell[f"{key}_ms"] = _attempt(functools.partial(time_ms, fn))
            if isinstance(ms, float) and isinstance(design, dict):
                cell[f"{key}_of_copy_bw"] = design["dram_bytes"] / (ms * 1e-3) / bandwidth
                cell[f"{key}_x_floor"] = ms / row[f"floor_{key}_ms"]
                cell[f"{key}_vs_model"] = ms * 1e3 / design["t_model_us"] if "t_model_us" in design else None
        row["variants"][variant] = cell
    if baselines:
        row["per_column_fwd_bwd_ms"] = _attempt(functools.partial(_fwd_bwd_ms, per_column_mix, inputs, dy))
    inputs.clear()
    dy = None
    torch.cuda.empty_cache()
    if dtype != torch.float32:
        row["sdpa_fwd_bwd_ms"] = _attempt(functools.partial(sdpa_ms, N, H * W, dtype))
        torch.cuda.empty_cache()
    for variant, cell in row["variants"].items():
        ours = _sum(cell["fwd_ms"], cell["bwd_ms"])
        for name in ("per_column", "sdpa"):
            other = row.get(f"{name}_fwd_bwd_ms")
            if ours is not None and isinstance(other, float):
                cell[f"speedup_vs_{name}"] = other / ours
    return row


def tune_rows(shapes, bandwidth, deadline: float, variant: str) -> list[dict]:
    """ours (fwd, bwd) under every Launch of TUNE_GRID, per shape; stops at the deadline."""
    rows = []
    for N, H, W, dtype in shapes:
        inputs, dy = _inputs(N, CHANNELS, CHANNELS, H, W, dtype)
        for values in itertools.product(*TUNE_GRID.values()):
            if time.monotonic() > deadline:
                print("tune: time is up, the remaining settings are skipped", flush=True)
                return rows
            launch = Launch(**dict(zip(TUNE_GRID, values)))
            t = cuda_plan.mix_traffic(N, CHANNELS, CHANNELS, H, W, dtype, launch=launch, variant=variant)
            fwd = functools.partial(cupy_backend.mix_forward, *inputs, None, launch, variant)
            bwd = functools.partial(cupy_backend.mix_backward, dy, *inputs, None, (True,) * 4, launch, variant)
            row = {"dtype": _name(dtype), "N": N, "H": H, "W": W, "variant": variant, **dict(zip(TUNE_GRID, values)),
                   "plan_fwd": t.get("plan_fwd"), "plan_bwd": t.get("plan_bwd"),
                   "fwd_ms": _attempt(functools.partial(time_ms, fwd)), "bwd_ms": _attempt(functools.partial(time_ms, bwd))}
            for key in ("fwd", "bwd"):
                if isinstance(row[f"{key}_ms"], float) and t[key]:
                    dram = t[key] - t[f"{key}_combine_read"]
                    row[f"{key}_of_copy_bw"] = dram / (row[f"{key}_ms"] * 1e-3) / bandwidth
            rows.append(row)
            print(f"tune {row['dtype']} {N}x{H}x{W} {dict(zip(TUNE_GRID, values))}: fwd {_fmt(row['fwd_ms'], 3)} "
                  f"bwd {_fmt(row['bwd_ms'], 3)} ms", flush=True)
        dy = None
        inputs.clear()
        torch.cuda.empty_cache()
    return rows


def plot(rows: list[dict], path: Path, device: str) -> bool:
    """ms (fwd + bwd) against tokens, bf16 rows: ours per variant, per-column, SDPA, floor (log-log); False
    without matplotlib."""
    rows = sorted((r for r in rows if r["dtype"] == "bf16"), key=lambda r: r["tokens"])
    variants = sorted({v for r in rows for v in r.get("variants", {})})
    series = {f"ours ({v})": (lambda r, v=v: _sum(r["variants"].get(v, {}).get("fwd_ms"),
                                                  r["variants"].get(v, {}).get("bwd_ms"))) for v in variants}
    series.update({"per-column launches": lambda r: r.get("per_column_fwd_bwd_ms"),
                   "SDPA flash attention": lambda r: r.get("sdpa_fwd_bwd_ms"),
                   "HBM floor": lambda r: r["floor_fwd_ms"] + r["floor_bwd_ms"]})
    points = {label: [(r["tokens"], value(r)) for r in rows if isinstance(value(r), float)]
              for label, value in series.items()}
    return log_log_plot(path, points, "tokens (H x W)", "forward + backward, ms",
                        f"gspn_mix, C = {CHANNELS}, bf16, batch as in the table\n{device}", dashed=("HBM floor",))


def print_gpu_row(row: dict, header: bool) -> None:
    if header:
        print(f"{'dtype':5} {'N x H x W':>11} {'variant':8} {'floor f/b':>13} {'ours f/b':>15} {'of copy bw f/b':>15} "
              f"{'model f/b':>11} {'per-column':>10} {'sdpa':>8} {'vs sdpa':>8}")
    for variant, cell in row["variants"].items():
        ours = f"{_fmt(cell['fwd_ms'], 3)}/{_fmt(cell['bwd_ms'], 3)}"
        frac = f"{_pct(cell.get('fwd_of_copy_bw'))}/{_pct(cell.get('bwd_of_copy_bw'))}"
        model = "/".join(_pct(d.get("modelled_of_copy_bw")) if isinstance(d, dict) else "-"
                         for d in (cell["design_fwd"], cell["design_bwd"]))
        print(f"{row['dtype']:5} {row['N']:>3}x{row['H']}x{row['W']:<4} {variant:8} "
              f"{_fmt(row['floor_fwd_ms'], 3)}/{_fmt(row['floor_bwd_ms'], 3):<6} {ours:>15} {frac:>15} {model:>11} "
              f"{_fmt(row.get('per_column_fwd_bwd_ms'), 1):>10} {_fmt(row.get('sdpa_fwd_bwd_ms'), 3):>8} "
              f"{_fmt(cell.get('speedup_vs_sdpa'), 2):>8}", flush=True)


def run_gpu(args, path: Path) -> dict:
    import cupy

    reason = cupy_backend.unavailable_reason()
    if reason is not None and not args.variants:
        _fail(f"the GPU benchmark needs the CUDA kernels: {reason} (--plans and --bytes work without a GPU)")
    variants = args.variants or [v for v in cuda_plan.VARIANTS if cupy_backend.unavailable_reason(v) is None]
    deadline = time.monotonic() + args.max_seconds
    bandwidth = copy_bandwidth()
    device = torch.cuda.get_device_name()
    print(f"{device}: copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write); variants {', '.join(variants)}",
          flush=True)
    result = {"benchmark": "benchmarks/kernel_bench.py", "mode": "gpu",
              "machine": machine(device=device, torch=torch.__version__, cuda=torch.version.cuda,
                                 cupy=cupy.__version__),
              "copy_bandwidth_GBps": bandwidth / 1e9, "variants": variants,
              "measured": (f"gspn_mix, 4 directions, global scan, x (N, {CHANNELS}, H, W), gate logits "
                           "(N, 4, 3, Cg, H, W); variants.<v>.fwd_ms / bwd_ms: the CUDA kernels alone, median "
                           "CUDA-event ms; *_of_copy_bw: bytes moved by design through DRAM / time / copy "
                           "bandwidth; design_*: the model's figures for the plan run (cuda_plan.design), "
                           "*_vs_model = measured / modelled time; floor: minimal bytes / copy bandwidth; sdpa: "
                           f"scaled_dot_product_attention, {HEADS} heads x {HEAD_DIM}, fwd + bwd; per_column: the "
                           "official code's launch structure, fwd + bwd"),
              "rows": [], "tuning": [], "skipped": []}
    launch = Launch()
    for N, H, W, dtype in args.shapes:
        if time.monotonic() > deadline:
            result["skipped"].append(f"{_name(dtype)} {N}x{H}x{W}")
            continue
        row = gpu_row(N, H, W, dtype, args.cg or CHANNELS, bandwidth, not args.no_baselines, launch, variants)
        result["rows"].append(row)
        print_gpu_row(row, header=len(result["rows"]) == 1)
        write_json(path, result)
    if result["skipped"]:
        print(f"time is up ({args.max_seconds} s): skipped {', '.join(result['skipped'])}")
    if args.tune:
        result["tuning"] = tune_rows(args.shapes, bandwidth, deadline + args.tune_seconds, variants[0])
        write_json(path, result)
    if plot(result["rows"], path.with_suffix(".png"), device):
        print(f"wrote {path.with_suffix('.png')}")
    else:
        print("matplotlib is not installed: no plot")
    return result


def failed_cells(result: dict) -> list[str]:
    """Every measured cell that failed (an error or out of memory), as 'row: key: reason'."""
    out = []

    def walk(obj, where: str) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{where}.{k}" if where else k)
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                walk(v, f"{where}[{i}]")
        elif isinstance(obj, str) and (obj.startswith("error") or obj == "oom"):
            out.append(f"{where}: {obj}")

    walk({"rows": result.get("rows", []), "tuning": result.get("tuning", [])}, "")
    return out


# ---------------------------------------------------------------------------------------------
# CPU: the compiled CPU kernel and the PyTorch backend against SDPA and the floor, in one run

CPU_CHANNELS, CPU_HEADS, CPU_HEAD_DIM = 384, 6, 64
CPU_SIDES = (16, 32, 64, 128)


def cpu_time_ms(fn, budget_s: float = 1.0, max_reps: int = 25) -> float:
    """Best wall-clock ms of fn(): one warm-up call, then repetitions filling about budget_s (a call that
    alone takes longer than the budget is timed once, its first call counting)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    if first > budget_s:
        return first * 1e3
    best = float("inf")
    for _ in range(int(max(3, min(max_reps, budget_s / max(first, 1e-6))))):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def cpu_copy_bandwidth(nbytes: int = 2**28) -> float:
    """Copy bandwidth of torch's threads in bytes/s, counting bytes read plus bytes written."""
    src, dst = torch.ones(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
    return 2 * nbytes / (cpu_time_ms(functools.partial(dst.copy_, src), budget_s=1.0) * 1e-3)


def cpu_throughput() -> dict:
    """ns per element of torch.sigmoid and of torch.addcmul (one multiply-add) over all threads, on tensors
    small enough to stay in cache: the machine's vectorised throughput for the op's kind of arithmetic."""
    n = 2**15 * torch.get_num_threads()
    a, b, c, out = (torch.rand(n) for _ in range(4))
    reps = 50

    def many(fn):
        return lambda: [fn() for _ in range(reps)]

    sig = cpu_time_ms(many(lambda: torch.sigmoid(a, out=out)), budget_s=0.5)
    fma = cpu_time_ms(many(lambda: torch.addcmul(a, b, c, out=out)), budget_s=0.5)
    return {"sigmoid_ns": sig * 1e6 / (reps * n), "multiply_add_ns": fma * 1e6 / (reps * n)}


def cpu_design_bytes(C: int, Cg: int, H: int, W: int) -> dict:
    """fp32 bytes gspn_mix moves by design (each input read once, each output written once), N = 1."""
    x, gates, maps = C * H * W, 12 * Cg * H * W, 8 * C * H * W  # x-like; the logits; lam and u
    return {"fwd": 4 * (x + gates + maps + x), "fwd_bwd": 4 * ((x + gates + maps + x) + (2 * x + gates + maps)
                                                               + (x + gates + maps))}


def _mix_ms(backend: str, inputs, dy, budget_s: float) -> tuple[float, float]:
    """(forward ms, forward + backward ms) of gspn_mix on one backend."""
    with torch.no_grad():
        fwd = cpu_time_ms(lambda: gspn_mix(*inputs, backend=backend), budget_s)
    leaves = [t.detach().requires_grad_() for t in inputs]
    both = cpu_time_ms(lambda: torch.autograd.grad(gspn_mix(*leaves, backend=backend), leaves, dy), budget_s)
    return fwd, both


def _sdpa_ms(tokens: int, budget_s: float) -> tuple[float, float]:
    qkv = [torch.randn(1, CPU_HEADS, tokens, CPU_HEAD_DIM) for _ in range(3)]
    with torch.no_grad():
        fwd = cpu_time_ms(lambda: F.scaled_dot_product_attention(*qkv), budget_s)
    leaves = [t.requires_grad_() for t in qkv]
    dy = torch.randn_like(qkv[0])
    both = cpu_time_ms(lambda: torch.autograd.grad(F.scaled_dot_product_attention(*leaves), leaves, dy), budget_s)
    return fwd, both


def cpu_row(side: int, bandwidth: float, rate: dict, with_torch: bool) -> dict:
    """One row: ours, the PyTorch backend and SDPA (fwd, fwd + bwd) and the floor, at side x side tokens."""
    C = CPU_CHANNELS
    cp = C * side * side
    design = cpu_design_bytes(C, C, side, side)
    arith_fwd = cp * (12 * rate["sigmoid_ns"] + 12 * rate["multiply_add_ns"]) * 1e-6
    arith_both = cp * (24 * rate["sigmoid_ns"] + 48 * rate["multiply_add_ns"]) * 1e-6
    row = {"tokens": side * side, "H": side, "W": side, "N": 1, "C": C, "Cg": C,
           "design_fwd_bytes": design["fwd"], "design_fwd_bwd_bytes": design["fwd_bwd"],
           "memory_floor_fwd_ms": design["fwd"] / bandwidth * 1e3,
           "memory_floor_fwd_bwd_ms": design["fwd_bwd"] / bandwidth * 1e3,
           "arith_floor_fwd_ms": arith_fwd, "arith_floor_fwd_bwd_ms": arith_both}
    row["floor_fwd_ms"] = max(row["memory_floor_fwd_ms"], arith_fwd)
    row["floor_fwd_bwd_ms"] = max(row["memory_floor_fwd_bwd_ms"], arith_both)
    (x, logits, lam, u), dy = mix_inputs(1, C, C, side, side, seed=side)
    row["ours_fwd_ms"], row["ours_fwd_bwd_ms"] = _mix_ms("cpu", (x, logits, lam, u), dy, 1.0)
    if with_torch:
        row["torch_fwd_ms"], row["torch_fwd_bwd_ms"] = _mix_ms("torch", (x, logits, lam, u), dy, 1.0)
    row["sdpa_fwd_ms"], row["sdpa_fwd_bwd_ms"] = _sdpa_ms(side * side, 1.0)
    for key in ("fwd", "fwd_bwd"):
        ours = row[f"ours_{key}_ms"]
        row[f"ours_{key}_x_floor"] = ours / row[f"floor_{key}_ms"]
        row[f"sdpa_over_ours_{key}"] = row[f"sdpa_{key}_ms"] / ours
        if with_torch:
            row[f"torch_over_ours_{key}"] = row[f"torch_{key}_ms"] / ours
    return row


def print_cpu_row(row: dict, header: bool) -> None:
    if header:
        print(f"{'tokens':>7} {'ours fwd':>9} {'ours f+b':>9} {'torch fwd':>9} {'torch f+b':>9} {'sdpa fwd':>9} "
              f"{'sdpa f+b':>9} {'sdpa/ours f+b':>13} {'floor fwd':>9} {'fwd x floor':>11}")
    print(f"{row['H']:>4}x{row['W']:<3} {_fmt(row['ours_fwd_ms'], 2):>9} {_fmt(row['ours_fwd_bwd_ms'], 2):>9} "
          f"{_fmt(row.get('torch_fwd_ms'), 1):>9} {_fmt(row.get('torch_fwd_bwd_ms'), 1):>9} "
          f"{_fmt(row['sdpa_fwd_ms'], 2):>9} {_fmt(row['sdpa_fwd_bwd_ms'], 2):>9} "
          f"{_fmt(row['sdpa_over_ours_fwd_bwd'], 2) + 'x':>13} {_fmt(row['floor_fwd_ms'], 2):>9} "
          f"{_fmt(row['ours_fwd_x_floor'], 2) + 'x':>11}", flush=True)


def cpu_plot(rows: list[dict], path: Path, title: str) -> bool:
    series = {"gspn_mix, compiled CPU kernel": "ours_fwd_bwd_ms", "gspn_mix, PyTorch backend": "torch_fwd_bwd_ms",
              "SDPA (6 heads x 64)": "sdpa_fwd_bwd_ms", "gspn_mix floor": "floor_fwd_bwd_ms"}
    points = {label: [(r["tokens"], r[key]) for r in rows if isinstance(r.get(key), float)]
              for label, key in series.items()}
    return log_log_plot(path, points, "tokens (H x W)", "forward + backward, ms", title, dashed=("gspn_mix floor",))


def run_cpu(args) -> dict:
    """The CPU table: one row per side, JSON rewritten after every row, then the plot."""
    from gspn_gen.kernels import cpu_backend

    reason = cpu_backend.unavailable_reason()
    if reason is not None:
        _fail(f"the compiled CPU kernel is unavailable here: {reason}")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    bandwidth = cpu_copy_bandwidth()
    rate = cpu_throughput()
    cpu = cpu_name()
    print(f"{cpu}, {threads} threads: copy {bandwidth / 1e9:.1f} GB/s (read + write), sigmoid "
          f"{rate['sigmoid_ns']:.3f} ns, multiply-add {rate['multiply_add_ns']:.3f} ns per element", flush=True)
    path = args.json or RESULTS / f"kernels-cpu-{slug(cpu)}-{_dt.date.today().isoformat()}.json"
    result = {"benchmark": "benchmarks/kernel_bench.py --device cpu", "mode": "cpu",
              "machine": machine(threads=threads, torch=torch.__version__), "copy_bandwidth_GBps": bandwidth / 1e9,
              **rate,
              "measured": (f"gspn_mix, 4 directions, global scan, x (1, {CPU_CHANNELS}, H, W), Cg = C, fp32, best "
                           "wall-clock ms; ours: backend='cpu' (compiled kernel), torch: backend='torch'; sdpa: "
                           f"scaled_dot_product_attention, {CPU_HEADS} heads x {CPU_HEAD_DIM}; fwd_bwd: forward and "
                           "the gradients of every input; floor: max(design bytes / copy bandwidth, 12 sigmoids + "
                           "12 multiply-adds per channel-pixel forward, 24 + 48 forward + backward, at the measured "
                           "ns per element)"),
              "rows": []}
    for side in args.sides:
        row = cpu_row(side, bandwidth, rate, with_torch=not args.no_baselines)
        result["rows"].append(row)
        print_cpu_row(row, header=len(result["rows"]) == 1)
        write_json(path, result)
    print(f"wrote {path}")
    if cpu_plot(result["rows"], path.with_suffix(".png"),
                f"gspn_mix vs SDPA, C = {CPU_CHANNELS}, fp32, N = 1\n{cpu}, {threads} threads"):
        print(f"wrote {path.with_suffix('.png')}")
    return result


# ---------------------------------------------------------------------------------------------
# Command line


def _fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def _sum(a, b):
    return a + b if isinstance(a, float) and isinstance(b, float) else None


def _fmt(v, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v[:10]
    return f"{v:.{digits}f}"


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def _shape(text: str):
    """NxHxW[:dtype], e.g. 4x64x64 or 4x64x64:fp32 (default bf16)."""
    dims, _, dtype = text.partition(":")
    parts = dims.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts) or (dtype and dtype not in DTYPES):
        raise argparse.ArgumentTypeError(f"shape must be NxHxW[:{'|'.join(DTYPES)}], got {text!r}")
    return (*map(int, parts), DTYPES[dtype or "bf16"])


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python benchmarks/kernel_bench.py", description=__doc__.split("\n")[0],
                                     epilog="Without --plans or --bytes it needs a CUDA GPU of compute capability "
                                            "8.0 or newer.")
    parser.add_argument("--plans", action="store_true",
                        help="only the design figures of every plan per architecture (no GPU needed)")
    parser.add_argument("--bytes", action="store_true", help="only the bytes-by-design table (no GPU needed)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: the compiled CPU kernel and the PyTorch backend against SDPA and the floor")
    parser.add_argument("--sides", type=int, nargs="+", default=list(CPU_SIDES),
                        help="--device cpu: square maps of side x side tokens (default 16 32 64 128)")
    parser.add_argument("--threads", type=int, default=None, help="--device cpu: torch threads (default: torch's)")
    parser.add_argument("--shapes", type=_shape, nargs="+",
                        default=[(*s, torch.bfloat16) for s in TARGETS] + EXTRA,
                        help="NxHxW[:dtype] (default: the four bf16 targets and 4x64x64:fp32)")
    parser.add_argument("--variants", nargs="+", choices=cuda_plan.VARIANTS, default=None,
                        help="CUDA variants to measure (default: every one that passes its trial on this GPU)")
    parser.add_argument("--cg", type=int, default=None, help=f"gate channels (default C = {CHANNELS})")
    parser.add_argument("--json", type=Path, default=None, help="output JSON (the plot goes beside it as .png)")
    parser.add_argument("--no-baselines", action="store_true", help="skip the per-column baseline")
    parser.add_argument("--tune", action="store_true", help="also sweep the kernels' launch settings")
    parser.add_argument("--max-seconds", type=float, default=240, help="stop starting new rows after this long")
    parser.add_argument("--tune-seconds", type=float, default=120, help="extra time the --tune sweep may take")
    parser.add_argument("--smem", type=int, default=232448,
                        help="--bytes: shared memory per block to plan for (default H100/H200: 232448)")
    args = parser.parse_args(argv)
    if args.cg is not None and (args.cg < 1 or CHANNELS % args.cg):
        parser.error(f"--cg must divide {CHANNELS}, got {args.cg}")
    if any(side < 1 for side in args.sides) or (args.threads is not None and args.threads < 1):
        parser.error(f"--sides and --threads must be >= 1, got {args.sides} and {args.threads}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device == "cpu":
        return run_cpu(args)
    if args.plans:
        return main_plans(args.json or RESULTS / "kernels-plans.json")
    if args.bytes:
        rows = bytes_rows(args.shapes, CHANNELS, args.cg or CHANNELS, args.smem)
        limits = limit_rows(args.smem)
        print_bytes(rows, limits)
        path = args.json or RESULTS / "kernels-bytes.json"
        result = {"benchmark": "benchmarks/kernel_bench.py", "mode": "bytes", "machine": machine(), "rows": rows,
                  "limits": limits}
        write_json(path, result)
        print(f"wrote {path}")
        return result
    if not torch.cuda.is_available():
        _fail("no CUDA device is visible to PyTorch; --plans and --bytes give the tables that need none")
    path = args.json or RESULTS / f"kernels-{slug(torch.cuda.get_device_name())}.json"
    result = run_gpu(args, path)
    write_json(path, result)
    print(f"wrote {path}")
    failed = failed_cells(result)
    if failed:
        print(f"error: {len(failed)} cell(s) failed: " + "; ".join(failed[:5]), file=sys.stderr)
    return result


if __name__ == "__main__":
    sys.exit(1 if failed_cells(main()) else 0)
