"""The real kernel sources compiled for sm_90 on the CPU: what the emulation replaces (inline PTX for
clusters, distributed shared memory and fp16, NVRTC without any CUDA header) must build for the GPU.

NVRTC gets the translation unit and options cupy_backend uses in production; ptxas must leave no
stack frame and no spills (a register array indexed at run time would land in local memory). nvcc
builds the same sources as an independent front end. A representative subset of the instantiations
keeps the time down: every dtype (fp16's PTX conversions), the cluster kernels and the one-CTA scan,
the epilogue; the GPU session compiles them all.
"""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from gspn_gen.kernels import cupy_backend

NAMES = ["gspn_mix_fwd<F16, 2>", "gspn_mix_bwd<BF16, 1>", "gspn_scan_bwd<F32, 4>", "gspn_gate_grad<F16>"]


def _nvrtc():
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as err:  # noqa: BLE001  (CuPy missing, or its NVRTC library not found)
        pytest.skip(f"NVRTC is not available here: {err}")
    return nvrtc


def test_nvrtc_builds_the_production_source_for_sm90():
    nvrtc = _nvrtc()
    prog = nvrtc.createProgram(cupy_backend.source(), "gspn.cu", [], [])
    for name in NAMES:
        nvrtc.addNameExpression(prog, name)
    try:
        nvrtc.compileProgram(prog, [*cupy_backend.COMPILE_OPTIONS, "--ptxas-options=--verbose"])
    except nvrtc.NVRTCError:
        pytest.fail(nvrtc.getProgramLog(prog).replace("\0", ""))
    log = nvrtc.getProgramLog(prog).replace("\0", "")
    assert len(nvrtc.getCUBIN(prog)) > 0
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert len(frames) == len(NAMES), log
    assert all(f == ("0", "0", "0") for f in frames), log
    assert "warning" not in log.lower(), log


def _nvcc() -> str:
    found = shutil.which("nvcc") or next((str(p) for p in Path("/usr/local").glob("cuda*/bin/nvcc")), None)
    if found is None:
        pytest.skip("nvcc is not installed here")
    return found


def test_nvcc_builds_the_sources_for_sm90(tmp_path):
    nvcc = _nvcc()
    unit = tmp_path / "gspn.cu"
    unit.write_text(cupy_backend.source() + "template __global__ void gspn_mix_bwd<F16, 2>(const __grid_constant__ Args);\n")
    done = subprocess.run(["nice", "-n", "10", nvcc, "-std=c++17", "-arch=sm_90", "-c", str(unit), "-o",
                           str(tmp_path / "gspn.o"), "-Xptxas", "-v", "-Werror", "all-warnings"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads" in done.stderr, done.stderr[-2000:]
