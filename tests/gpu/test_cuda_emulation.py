"""The CUDA kernels' logic on the CPU: kernels/cuda/*.cu compiled with g++ and run by cuda_emulation.cpp.

No GPU needed: each block runs as std::threads with a barrier for __syncthreads. The host code of
cupy_backend (launch plan, argument order, buffers, casts, autograd Functions) runs unchanged with
its two CuPy hooks (`_kernels`, `_launch`) pointed at the emulation, on CPU tensors. Checks indexing,
tiling, chunks, compact gates, the backward and bfloat16 rounding against the float64 reference;
fp16 (PTX conversions), speed and the GPU memory model are left to test_cuda_kernels.py.
"""

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from gspn_gen.kernels import cupy_backend

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="the CPU emulation of the CUDA kernels needs g++")

_HERE = Path(__file__).resolve().parent
_CUDA_DIR = Path(cupy_backend.__file__).resolve().parent / "cuda"
_ENTRY = {"gspn_mix_fwd": "mix_fwd", "gspn_scan_fwd": "scan_fwd", "gspn_mix_bwd": "mix_bwd",
          "gspn_scan_bwd": "scan_bwd", "gspn_mix_gate_grad": "mix_gate_grad"}


@pytest.fixture(scope="module")
def emulation(tmp_path_factory):
    lib_path = tmp_path_factory.mktemp("cuda_emulation") / "libgspn_emulation.so"
    cmd = ["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", f"-I{_CUDA_DIR}",
           str(_HERE / "cuda_emulation.cpp"), "-o", str(lib_path)]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if done.returncode != 0 and "barrier" in done.stderr and "No such file" in done.stderr:
        pytest.skip("g++ lacks C++20 <barrier>")
    assert done.returncode == 0, done.stderr[-4000:]
    return ctypes.CDLL(str(lib_path))


def _c_arg(value):
    if isinstance(value, np.uint64):
        return ctypes.c_void_p(int(value) or None)
    return ctypes.c_int(int(value))


@pytest.fixture
def emulated(emulation, monkeypatch):
    """Point cupy_backend at the emulation; returns a setter for threads / tile cap / shared budget."""

    def kernels(device_index, tag):
        return {name: getattr(emulation, f"{entry}_{tag}") for name, entry in _ENTRY.items()}

    def launch(kernel, grid, smem, args, device):
        assert device.type == "cpu"
        kernel(grid[0], grid[1], cupy_backend.THREADS, smem, *map(_c_arg, args))

    monkeypatch.setattr(cupy_backend, "_kernels", kernels)
    monkeypatch.setattr(cupy_backend, "_launch", launch)

    def configure(threads=32, tile_max=32, budget=48 * 1024):
        monkeypatch.setattr(cupy_backend, "THREADS", threads)
        monkeypatch.setattr(cupy_backend, "TILE_MAX", tile_max)
        monkeypatch.setattr(cupy_backend, "SMEM_BUDGET", budget)

    configure()
    before = emulation.emu_error_count()
    yield configure
    assert emulation.emu_error_count() == before, "a block wrote past the shared memory the host gave it"


def _mix(x, gate_logits, lam, u, chunk):
    return cupy_backend._GspnMix.apply(x, gate_logits, lam, u, chunk)


def _scan(x, lam, g_up, g_mid, g_down, chunk):
    return cupy_backend._GspnScan.apply(x, lam, g_up, g_mid, g_down, chunk)


# (N, C, Cg, H, W), chunk, threads per block, most steps per tile
MIX_CASES = [
    ((2, 4, 4, 5, 7), None, 32, 32),   # H != W, odd, one gate channel per channel (fused gate grads)
    ((1, 4, 2, 7, 5), 3, 32, 32),      # compact gates (atomics + epilogue), chunk not dividing
    ((1, 3, 1, 6, 6), 2, 64, 4),       # square, several tiles per scan, chunk dividing
    ((2, 2, 2, 1, 9), None, 32, 4),    # H = 1
    ((1, 2, 1, 9, 1), 4, 32, 32),      # W = 1
    ((1, 2, 2, 37, 3), None, 32, 32),  # lines longer than the block: several positions per thread
    ((1, 2, 2, 3, 37), 5, 96, 3),      # same for row lines, block size not a power of two
    ((1, 2, 2, 8, 11), 1, 32, 32),     # chunk 1: no propagation at all
    ((2, 4, 2, 9, 10), 4, 256, 32),    # the GPU's default block size
]


@pytest.mark.parametrize("shape, chunk, threads, tile_max", MIX_CASES)
def test_mix_emulated_matches_reference(emulated, kc, shape, chunk, threads, tile_max):
    emulated(threads=threads, tile_max=tile_max)
    kc.check_mix(_mix, shape, torch.float32, chunk, "cpu", seed=sum(shape) + (chunk or 0))


@pytest.mark.parametrize("shape, chunk", [((2, 4, 2, 5, 7), None), ((1, 3, 3, 6, 9), 4)])
def test_mix_emulated_bfloat16(emulated, kc, shape, chunk):
    kc.check_mix(_mix, shape, torch.bfloat16, chunk, "cpu", seed=7)


def test_mix_emulated_small_shared_budget(emulated, kc):
    emulated(threads=32, budget=4096)  # forces one- or two-step tiles
    kc.check_mix(_mix, (1, 4, 2, 9, 10), torch.float32, 3, "cpu", seed=3)


SCAN_CASES = [
    ((2, 4, 4, 5, 7), None, 32, 32),
    ((1, 4, 2, 7, 5), 3, 32, 2),
    ((1, 2, 1, 1, 9), 4, 32, 32),
    ((1, 2, 2, 9, 1), None, 32, 32),
    ((1, 2, 2, 40, 6), 5, 32, 4),
]


@pytest.mark.parametrize("shape, chunk, threads, tile_max", SCAN_CASES)
def test_scan_emulated_matches_reference(emulated, kc, shape, chunk, threads, tile_max):
    emulated(threads=threads, tile_max=tile_max)
    kc.check_scan(_scan, shape, torch.float32, chunk, "cpu", seed=sum(shape))


def test_scan_emulated_bfloat16(emulated, kc):
    kc.check_scan(_scan, (2, 4, 2, 6, 7), torch.bfloat16, 3, "cpu", seed=11)


@pytest.mark.parametrize("cg", [4, 2])
def test_emulated_outputs_fully_written(emulated, kc, monkeypatch, cg):
    """Buffers the kernels must fill start as NaN: every element is written (or a NaN shows)."""
    monkeypatch.setattr(cupy_backend, "_new_output",
                        lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device))
    kc.check_mix(_mix, (2, 4, cg, 6, 5), torch.float32, 4, "cpu", seed=5)
    kc.check_scan(_scan, (2, 4, cg, 6, 5), torch.float32, None, "cpu", seed=6)


def test_emulated_partial_gradients(emulated, kc):
    """Only the gradients asked for are computed; each matches the reference."""
    (x, logits, lam, u), dy = kc.mix_inputs(1, 4, 2, 5, 6, torch.float32, "cpu", seed=9)
    from gspn_gen.kernels.reference import gspn_mix_reference

    for wanted in range(4):
        leaves = [t.clone().requires_grad_(i == wanted) for i, t in enumerate((x, logits, lam, u))]
        grad = torch.autograd.grad(_mix(*leaves, None), leaves[wanted], dy)[0]
        exact = [t.double().requires_grad_(i == wanted) for i, t in enumerate((x, logits, lam, u))]
        ref = torch.autograd.grad(gspn_mix_reference(*exact, None), exact[wanted], dy.double())[0]
        torch.testing.assert_close(grad.double(), ref, rtol=1e-5, atol=1e-5)
