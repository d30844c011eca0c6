"""The real kernel sources compiled for the GPUs they target, on the CPU: what the emulation replaces (inline
PTX for asynchronous copies, clusters, distributed shared memory and fp16, NVRTC without any CUDA header)
must build for sm_80, sm_86, sm_89 (the portable variant) and sm_90 (both variants).

NVRTC gets the translation unit and options cupy_backend uses in production; ptxas must leave no stack
frame and no spills (a register array indexed at run time would land in local memory), use no more
registers than the planner assumes (cuda_plan.ASSUMED_REGS) and, for gspn_mix's backward up to 4
positions per lane, few enough for two CTAs of the default plans' 192 threads per SM; the PTX has
no approximate division, reciprocal or exponential (fp32 results are those of the emulation). nvcc
builds the same sources as an independent front end. A representative subset of the instantiations per
architecture keeps the time down (the four builds run in parallel threads); `kernel_bench.py --plans`
compiles every one and reports their registers.
"""

import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from gspn_gen.kernels import cupy_backend
from gspn_gen.kernels.cuda_plan import ARCHS, ASSUMED_REGS, Launch, ctas_per_sm

SUBSETS = {  # every dtype, R, kernel and variant at least once over the four
    90: ["gspn_mix_fwd<F16, 2>", "gspn_mix_bwd<BF16, 1>", "gspn_scan_bwd<F32, 4>", "gspn_gate_grad<F16>"],
    80: ["gspn_mix_fwd_portable<BF16, 1>", "gspn_mix_bwd_portable<F32, 2>"],
    86: ["gspn_mix_bwd_portable<F16, 8>"],
    89: ["gspn_mix_bwd_portable<BF16, 4>", "gspn_mix_bwd_portable<BF16, 1>", "gspn_scan_fwd<F16, 8>"],
}


def _nvrtc():
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as err:  # noqa: BLE001  (CuPy missing, or its NVRTC library not found)
        pytest.skip(f"NVRTC is not available here: {err}")
    return nvrtc


def _build(sm: int) -> tuple[dict, str]:
    nvrtc = _nvrtc()
    names = SUBSETS[sm]
    prog = nvrtc.createProgram(cupy_backend.source(), "gspn.cu", [], [])
    for name in names:
        nvrtc.addNameExpression(prog, name)
    try:
        nvrtc.compileProgram(prog, [*cupy_backend.compile_options(sm), "--ptxas-options=--verbose"])
    except nvrtc.NVRTCError:
        pytest.fail(f"sm_{sm}: " + nvrtc.getProgramLog(prog).replace("\0", ""))
    log = nvrtc.getProgramLog(prog).replace("\0", "")
    assert len(nvrtc.getCUBIN(prog)) > 0
    lowered = {nvrtc.getLoweredName(prog, name): name for name in names}
    report = {}
    for block in re.split(r"(?=ptxas info\s*: Compiling entry function)", log):
        m = re.search(r"Compiling entry function '(\S+)'", block)
        if m and m.group(1) in lowered:
            frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", block)
            report[lowered[m.group(1)]] = (int(re.search(r"Used (\d+) registers", block).group(1)),
                                           *map(int, frame.groups()))
    return report, log + "\n" + nvrtc.getPTX(prog).decode(errors="replace")


@pytest.fixture(scope="module")
def builds():
    _nvrtc()
    with ThreadPoolExecutor(2) as pool:
        return dict(zip(SUBSETS, pool.map(_build, SUBSETS)))


@pytest.mark.parametrize("sm", sorted(SUBSETS))
def test_nvrtc_builds_the_production_source(builds, sm):
    report, text = builds[sm]
    assert sorted(report) == sorted(SUBSETS[sm]), text[:4000]
    for name, (regs, stack, spill_st, spill_ld) in report.items():
        assert (stack, spill_st, spill_ld) == (0, 0, 0), (sm, name, report)
        kind = "bwd" if "_bwd" in name else "fwd"
        R = int(re.search(r", (\d)>", name).group(1)) if "gate_grad" not in name else 1
        assert regs <= ASSUMED_REGS[kind][R], (sm, name, regs, ASSUMED_REGS[kind][R])
        if name.startswith("gspn_mix_bwd") and R <= 4:  # two CTAs of the default plans' threads per SM
            threads = Launch().scan_lanes + Launch().loaders
            assert ctas_per_sm(threads, 0, regs, ARCHS[f"sm_{sm}"])[0] >= 2, (sm, name, regs)
    log, ptx = text.split("\n//", 1) if "\n//" in text else (text, "")
    assert "warning" not in log.lower(), log
    for approx in ("div.approx", "div.full", "rcp.approx", "ex2.approx"):
        assert approx not in ptx, (sm, approx)
    assert "rcp.rn.f32" in ptx or "div.rn.f32" in ptx  # the IEEE divisions of the sigmoid and the normalisation


def test_cluster_kernels_only_for_sm90():
    """The portable variant's kernel list holds no cluster kernel (they do not exist below sm_90)."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        names = cupy_backend.kernel_names(dtype, "portable")
        assert names and not [n for n in names if n.startswith(("gspn_mix_fwd<", "gspn_mix_bwd<"))]
        assert set(names) < set(cupy_backend.kernel_names(dtype, "cluster")) | set(names)


def _nvcc() -> str:
    found = shutil.which("nvcc") or next((str(p) for p in Path("/usr/local").glob("cuda*/bin/nvcc")), None)
    if found is None:
        pytest.skip("nvcc is not installed here")
    return found


def test_nvcc_builds_the_portable_kernels_for_sm80(tmp_path):
    nvcc = _nvcc()
    unit = tmp_path / "gspn.cu"
    unit.write_text(cupy_backend.source()
                    + "template __global__ void gspn_mix_bwd_portable<BF16, 4>(const __grid_constant__ Args);\n")
    done = subprocess.run(["nice", "-n", "10", nvcc, "-std=c++17", "-arch=sm_80", "-c", str(unit), "-o",
                           str(tmp_path / "gspn.o"), "-Xptxas", "-v", "-Werror", "all-warnings"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads" in done.stderr, done.stderr[-2000:]


def test_backward_register_caps_are_the_planners_assumption():
    """The backward kernels are compiled with __maxnreg__(backward_regs<R>()) (CUDA 12.4+): the caps are
    ASSUMED_REGS["bwd"]."""
    text = (Path(cupy_backend.__file__).resolve().parent / "cuda" / "gspn_backward.cu").read_text()
    m = re.search(r"backward_regs\(\) \{ return R <= 2 \? (\d+) : \(R == 4 \? (\d+) : (\d+)\); \}", text)
    assert m, "backward_regs not found in gspn_backward.cu"
    caps = dict(zip((1, 2, 4, 8), map(int, (m.group(1), m.group(1), m.group(2), m.group(3)))))
    assert caps == ASSUMED_REGS["bwd"]
    assert text.count("GSPN_MAXNREG(backward_regs<R>())") == 3  # gspn_mix_bwd, gspn_mix_bwd_portable, gspn_scan_bwd
