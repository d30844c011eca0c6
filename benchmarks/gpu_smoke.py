"""The GPU check's smoke step: are the kernels right and roughly as fast as designed, before anything slower runs?

    python3 benchmarks/gpu_smoke.py --json OUT/smoke.json [--max-seconds 85]

Needs torch and CuPy only (no pytest, Lightning or training dependencies). In order, each row appended to the
JSON as soon as it is measured (a run cut short keeps what it did):
  device   the GPU, its compute capability, SMs and shared memory, torch / CUDA / CuPy versions;
  compile  every kernel of each variant the device supports (cluster: sm_90+; portable: sm_80+), timed,
           with each kernel's registers and local memory (a failure is recorded and the variant skipped);
  check    each variant, forward and backward of gspn_mix and gspn_scan at three small odd shapes (bf16,
           fp32, fp16; compact gates; chunks), against the PyTorch backend in fp32 on the same GPU
           (relative L2 error per output, cupy_backend.TRIAL_TOLERANCE), and the variants bitwise equal;
  copy     the device-to-device copy bandwidth;
  time     gspn_mix forward and backward of each variant at the target shapes (bf16 32x16², 8x32², 4x64²,
           1x128², fp32 4x64², C = 1152): milliseconds, bytes by design through DRAM / time / copy bandwidth,
           and the design model's fraction for the same plan; where the backward plan loads its resident
           tiles ahead (lookahead D > 0), the backward also without (bwd_ms_lookahead_0).
Exit status 0 when every compile and check passed (timings are reported, not judged), 1 otherwise, 3
without a usable GPU. Rows past --max-seconds are skipped and recorded as such.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from pathlib import Path

import torch
from gspn_gen.kernels import cuda_plan, cupy_backend
from gspn_gen.kernels.testing import copy_bandwidth, mix_inputs, time_ms

from gspn_gen.fileio import write_json

CHECKS = [((2, 8, 4, 16, 16), torch.bfloat16, None), ((1, 6, 3, 33, 20), torch.float32, 5),
          ((2, 4, 4, 24, 40), torch.float16, 7)]
TARGETS = [(32, 16, 16, torch.bfloat16), (8, 32, 32, torch.bfloat16), (4, 64, 64, torch.bfloat16),
           (1, 128, 128, torch.bfloat16), (4, 64, 64, torch.float32)]
CHANNELS = 1152
NO_LOOKAHEAD = cuda_plan.Launch(lookahead=0)   # the backward's resident copies kept with the ring
NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


class Report:
    """The JSON: rows appended and written after each, the first failure remembered."""

    def __init__(self, path: Path, deadline: float):
        self.path, self.deadline = path, deadline
        self.result = {"benchmark": "benchmarks/gpu_smoke.py", "rows": [], "failures": [], "skipped": []}

    def add(self, row: dict, failure: str | None = None) -> None:
        self.result["rows"].append(row)
        if failure:
            self.result["failures"].append(failure)
            print(f"FAIL {failure}", flush=True)
        write_json(self.path, self.result)

    def late(self, what: str) -> bool:
        if time.monotonic() < self.deadline:
            return False
        self.result["skipped"].append(what)
        write_json(self.path, self.result)
        return True


def _device_row(index: int) -> dict:
    import cupy

    limits = cupy_backend._device_limits(index)
    return {"step": "device", "name": limits.name, "sm": limits.sm, "sms": limits.sms, "smem_block": limits.smem_block,
            "smem_sm": limits.smem_sm, "torch": torch.__version__, "cuda": torch.version.cuda, "cupy": cupy.__version__}


def compile_step(report: Report, index: int, variant: str) -> bool:
    start = time.perf_counter()
    try:
        kernels = cupy_backend._kernels(index, variant)
    except Exception as err:  # noqa: BLE001  (NVRTC and loader errors come in several types)
        report.add({"step": "compile", "variant": variant, "error": str(err)[:2000]},
                   f"compile {variant}: {cupy_backend._first_line(err)}")
        return False
    seconds = time.perf_counter() - start
    regs = {name: {"registers": k.num_regs, "local_bytes": k.local_size_bytes} for name, k in sorted(kernels.items())}
    local = [name for name, r in regs.items() if r["local_bytes"]]
    print(f"compiled {len(kernels)} kernels of the {variant} variant in {seconds:.1f} s", flush=True)
    report.add({"step": "compile", "variant": variant, "seconds": seconds, "kernels": regs},
               f"compile {variant}: local memory in {local}" if local else None)
    return not local


def check_step(report: Report, index: int, variants: list[str]) -> None:
    for shape, dtype, chunk in CHECKS:
        outputs = {}
        for variant in variants:
            if report.late(f"check {variant} {shape} {NAMES[dtype]}"):
                return
            row = {"step": "check", "variant": variant, "shape": shape, "dtype": NAMES[dtype], "chunk": chunk}
            try:
                errors, outputs[variant] = cupy_backend.compare(variant, index, shape, dtype, chunk, seed=sum(shape))
                row["errors"] = errors
            except Exception as err:  # noqa: BLE001  (launch and driver errors come in several types)
                report.add({**row, "error": str(err)[:2000]}, f"check {variant} {shape}: {cupy_backend._first_line(err)}")
                continue
            bad = {k: v for k, v in errors.items() if not v <= cupy_backend.TRIAL_TOLERANCE[dtype]}
            print(f"check {variant:8} {NAMES[dtype]} {shape} chunk {chunk}: worst relative error "
                  f"{max(errors.values()):.2e}" + (f"  OFF: {bad}" if bad else ""), flush=True)
            report.add(row, f"check {variant} {shape} {NAMES[dtype]}: {bad}" if bad else None)
        if len(outputs) == 2:
            same = all(torch.equal(a, b) for a, b in zip(*outputs.values()))
            report.add({"step": "check", "what": "variants bitwise equal", "shape": shape, "dtype": NAMES[dtype],
                        "equal": same}, None if same else f"variants differ at {shape} {NAMES[dtype]}")


def time_step(report: Report, index: int, variants: list[str], bandwidth: float) -> None:
    limits = cupy_backend._device_limits(index)
    card = cuda_plan.ARCHS.get(f"sm_{limits.sm}", cuda_plan.ARCHS["sm_90"])
    device = dataclasses.replace(limits, copy_bw=bandwidth, clock_ghz=card.clock_ghz)
    for N, H, W, dtype in TARGETS:
        if report.late(f"time {N}x{H}x{W} {NAMES[dtype]}"):
            return
        inputs, dy = mix_inputs(N, CHANNELS, CHANNELS, H, W, dtype, "cuda", seed=1)
        for variant in variants:
            row = {"step": "time", "variant": variant, "N": N, "H": H, "W": W, "C": CHANNELS, "dtype": NAMES[dtype]}
            for key, backward in (("fwd", False), ("bwd", True)):
                design = cuda_plan.design(N, CHANNELS, CHANNELS, H, W, dtype, backward, variant, device)
                if design is None:
                    row[f"{key}_ms"] = "no plan (PyTorch backend)"
                    continue
                if backward:
                    fn = functools.partial(cupy_backend.mix_backward, dy, *inputs, None, (True,) * 4, variant=variant)
                else:
                    fn = functools.partial(cupy_backend.mix_forward, *inputs, None, variant=variant)
                try:
                    ms = time_ms(fn, budget_s=0.1, max_reps=20)
                except Exception as err:  # noqa: BLE001
                    row[f"{key}_ms"] = f"error: {cupy_backend._first_line(err)}"
                    continue
                row[f"{key}_ms"] = ms
                row[f"{key}_of_copy_bw"] = design["dram_bytes"] / (ms * 1e-3) / bandwidth
                row[f"{key}_modelled_of_copy_bw"] = design.get("modelled_of_copy_bw")
                if backward and any(design["plan"]["lookahead"]):  # the resident lookahead measured against none
                    row["bwd_lookahead"] = design["plan"]["lookahead"]
                    try:
                        row["bwd_ms_lookahead_0"] = time_ms(functools.partial(fn, launch=NO_LOOKAHEAD), budget_s=0.1,
                                                            max_reps=20)
                    except Exception as err:  # noqa: BLE001
                        row["bwd_ms_lookahead_0"] = f"error: {cupy_backend._first_line(err)}"
            failed = [v for v in row.values() if isinstance(v, str) and v.startswith("error")]
            print(f"time {variant:8} {NAMES[dtype]} {N}x{H}x{W}: " + ", ".join(
                f"{k} {row[f'{k}_ms']:.3f} ms ({100 * row[f'{k}_of_copy_bw']:.0f}% of copy bw, model "
                f"{100 * (row[f'{k}_modelled_of_copy_bw'] or 0):.0f}%)" if isinstance(row.get(f"{k}_ms"), float)
                else f"{k} {row.get(f'{k}_ms')}" for k in ("fwd", "bwd")), flush=True)
            report.add(row, f"time {variant} {N}x{H}x{W}: {failed}" if failed else None)
        inputs = dy = fn = None
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python3 benchmarks/gpu_smoke.py", description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, required=True, help="output JSON (rewritten after every row)")
    parser.add_argument("--max-seconds", type=float, default=85, help="rows starting after this long are skipped")
    args = parser.parse_args(argv)
    report = Report(args.json, time.monotonic() + args.max_seconds)
    if not torch.cuda.is_available():
        report.add({"step": "device", "error": "no CUDA device"}, "no CUDA device is visible to PyTorch")
        return 3
    reason = cupy_backend._precondition()
    if reason is not None:
        report.add({"step": "device", "error": reason}, reason)
        return 3
    index = torch.cuda.current_device()
    device_row = _device_row(index)
    print(f"{device_row['name']} sm_{device_row['sm']}, {device_row['sms']} SMs, torch {device_row['torch']}, "
          f"CuPy {device_row['cupy']}", flush=True)
    report.add(device_row)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True  # fresh outputs are NaN: unwritten ones fail
    supported = [v for v in cuda_plan.VARIANTS if device_row["sm"] >= cupy_backend._MIN_SM[v]]
    if not supported:
        report.add({"step": "device"}, f"sm_{device_row['sm']} is below sm_80: no CUDA variant runs here")
        return 3
    variants = [v for v in supported if compile_step(report, index, v)]
    check_step(report, index, variants)
    torch.use_deterministic_algorithms(False)
    torch.utils.deterministic.fill_uninitialized_memory = False
    if not report.late("copy bandwidth"):
        bandwidth = copy_bandwidth()
        print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write)", flush=True)
        report.add({"step": "copy", "GBps": bandwidth / 1e9})
        time_step(report, index, variants, bandwidth)
    failures = report.result["failures"]
    print(f"smoke: {len(failures)} failure(s)" + (f": {failures[:3]}" if failures else ""), flush=True)
    return 1 if failures or not variants else 0


if __name__ == "__main__":
    sys.exit(main())
