"""The CUDA kernels on the CPU: kernels/cuda/*.cu compiled by g++ (cuda_emulation.cpp) and driven through
cupy_backend's own plan, argument struct and allocation, against the float64 oracle.

Covers the kernels' indexing, tiling, chunks, compact gates (summed inside a CTA and through the
scratch epilogue), 16-byte vector and scalar paths, lines held by several lanes per position (R > 1),
partial last groups, the cluster's distributed-shared-memory sum, fp32 / bf16 / fp16 rounding, and the
global bytes each launch moves against `mix_traffic`. Outputs start as NaN (torch's deterministic fill),
so an element the kernels never write fails the comparison. Speed and the GPU memory model are for
tests/gpu.
"""

import ctypes

import pytest
import torch
from gspn_gen.kernels import cupy_backend, testing
from gspn_gen.kernels.cupy_backend import Launch

from tests.helpers import backend
from tests.kernels.emulation import SMALL, emulation_from

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
WIDE = Launch(loaders=32, scan_lanes=64, tile=8, smem=96 * 1024)   # tiles long enough for bf16 / fp16 vectors
NARROW = Launch(loaders=32, scan_lanes=16, tile=4, smem=96 * 1024)  # one or two planes per CTA
LINES = Launch(loaders=32, scan_lanes=128, tile=8, smem=96 * 1024)  # long lines of few planes on several warps

# (N, C, Cg, H, W), chunk, dtype, launch settings
MIX_CASES = [
    ((2, 4, 4, 5, 7), None, F32, SMALL),     # H != W, odd, one gate channel per channel, several planes per CTA
    ((1, 6, 3, 7, 8), 3, F32, SMALL),        # compact gates summed in the CTA, fp32 vectors, chunk not dividing
    ((1, 4, 1, 6, 6), 2, F32, NARROW),       # compact gates wider than a CTA's planes: scratch + epilogue
    ((2, 2, 2, 1, 9), None, F32, SMALL),     # H = 1
    ((1, 2, 1, 9, 1), 4, F32, SMALL),        # W = 1
    ((1, 2, 2, 37, 3), None, F32, SMALL),    # column lines longer than a warp: 2 positions per lane
    ((1, 2, 2, 3, 70), 5, F32, SMALL),       # row lines of 70: 4 positions per lane
    ((1, 2, 2, 8, 11), 1, F32, SMALL),       # chunk 1: nothing propagates
    ((3, 5, 5, 17, 12), 6, F32, SMALL),      # 15 planes: a partial last group; chunk dividing W
    ((1, 2, 1, 4, 200), None, F32, NARROW),  # lines of 200: 8 positions per lane, fp32 vectors
    ((2, 8, 8, 16, 16), None, BF16, WIDE),   # bf16 16-byte vectors
    ((1, 3, 3, 12, 8), 4, BF16, SMALL),      # bf16 scalar path, several tiles
    ((1, 4, 2, 8, 16), 6, F16, WIDE),        # fp16 vectors, compact gates
    ((1, 4, 4, 5, 6), None, F16, NARROW),    # fp16 scalar path
    ((1, 2, 2, 9, 70), 3, F32, LINES),       # row lines of 70 on 2 warps (2 positions per lane)
    ((1, 1, 1, 100, 7), None, BF16, LINES),  # column lines of 100 on 4 warps
    ((1, 2, 1, 40, 40), 7, F16, LINES),      # both kinds on 2 warps, compact gates
]


def _plan(shape, dtype, launch, backward=True, mix=True, vec_ok=True):
    N, C, Cg, H, W = shape
    return cupy_backend._plan(N, C, Cg, H, W, dtype.itemsize, backward, mix, vec_ok, launch, launch.smem)


def test_cases_cover_every_path():
    """The cases above reach every branch of the plan: gate modes, vectors, R values, groups, tiles."""
    plans = [(_plan(shape, dtype, launch), shape) for shape, _, dtype, launch in MIX_CASES]
    assert {p.gmode for p, _ in plans} == {0, 1, 2}
    assert {p.V > 1 for p, _ in plans} == {False, True}
    assert {p.V for p, _ in plans if p.V > 1} == {4, 8}
    assert {p.R for p, _ in plans} == set(cupy_backend.R_VALUES)
    assert {g.W for p, _ in plans for g in p.geo} == set(cupy_backend.LINE_WARPS)
    assert any(g.W > 1 and g.P % (32 * g.W * p.R) for p, _ in plans for g in p.geo)  # a partly filled last warp
    assert any(p.lb > 1 for p, _ in plans) and any(p.lb == 1 for p, _ in plans)
    assert any((s[0] * s[1]) % p.lb for p, s in plans)                     # partial last group
    assert all(max(g.nt for g in p.geo) > 1 for p, _ in plans[:3])         # several tiles per scan


@pytest.mark.parametrize("shape, chunk, dtype, launch", MIX_CASES)
def test_mix_matches_oracle(emulation, shape, chunk, dtype, launch):
    testing.check_mix(testing.backend_mix(backend(launch)), shape, dtype, chunk, seed=sum(shape) + (chunk or 0))


SCAN_CASES = [
    ((2, 4, 4, 5, 7), None, F32, SMALL),
    ((1, 6, 2, 7, 8), 3, F32, SMALL),       # compact gates summed in the CTA, vectors
    ((1, 4, 1, 6, 5), None, F32, NARROW),   # compact gates through the scratch
    ((1, 2, 1, 1, 9), 4, F32, SMALL),
    ((1, 2, 2, 9, 1), None, F32, SMALL),
    ((1, 2, 2, 40, 6), 5, F32, SMALL),
    ((1, 2, 2, 70, 5), None, F32, LINES),   # lines of 70 on 4 warps
    ((2, 4, 2, 6, 16), 3, BF16, WIDE),
    ((1, 4, 4, 7, 5), 2, F16, SMALL),
]


@pytest.mark.parametrize("shape, chunk, dtype, launch", SCAN_CASES)
def test_scan_matches_oracle(emulation, shape, chunk, dtype, launch):
    testing.check_scan(testing.backend_scan(backend(launch)), shape, dtype, chunk, seed=sum(shape))


def test_outputs_start_poisoned(emulation):
    """The fixture's fill makes every fresh output NaN, so an unwritten element cannot pass."""
    assert torch.isnan(torch.empty(8)).all() and torch.isnan(torch.empty(8, dtype=BF16)).all()


@pytest.mark.parametrize("cg", [4, 2, 1])
def test_partial_gradients(emulation, cg):
    """Only the gradients asked for are computed (the others come back None), each right on its own."""
    (x, logits, lam, u), dy = testing.mix_inputs(1, 4, cg, 5, 8, F32, seed=9)
    mix = backend(NARROW)
    full = cupy_backend.mix_backward(dy, x, logits, lam, u, 3, (True,) * 4, launch=NARROW)
    for wanted in range(4):
        needs = tuple(i == wanted for i in range(4))
        grads = mix.mix_backward(dy, x, logits, lam, u, 3, needs)
        assert [g is not None for g in grads] == list(needs)
        assert torch.equal(grads[wanted], full[wanted])
    (x, lam, *gates), dh = testing.scan_inputs(1, 4, cg, 5, 8, F32, seed=10)
    full = cupy_backend.scan_backward(dh, x, lam, *gates, None, (True,) * 5, launch=NARROW)
    for wanted in range(5):
        needs = tuple(i == wanted or (wanted >= 2 and i >= 2) for i in range(5))
        grads = mix.scan_backward(dh, x, lam, *gates, None, needs)
        assert torch.equal(grads[wanted], full[wanted])
        assert grads[0 if wanted else 1] is None


def test_bitwise_reproducible(emulation):
    """Fixed-order sums, no atomics: two runs agree bit for bit."""
    inputs, dy = testing.mix_inputs(2, 6, 3, 9, 8, BF16, seed=4)
    fn = testing.backend_mix(backend(SMALL))
    first, second = (testing.run(fn, inputs, dy, 4) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_misaligned_pointers_take_the_scalar_path(emulation):
    """A tensor whose data is not 16-byte aligned gets scalar loads (a misaligned vector load would be
    reported by the emulation) and the same result as aligned copies."""
    (x, logits, lam, u), _ = testing.mix_inputs(1, 4, 4, 6, 8, F32, seed=5)
    shifted = torch.empty(x.numel() + 1)[1:].view_as(x).copy_(x)
    assert shifted.data_ptr() % 16 and shifted.is_contiguous()
    assert _plan((1, 4, 4, 6, 8), F32, SMALL, backward=False, vec_ok=False).V == 1
    y = cupy_backend.mix_forward(shifted, logits, lam, u, None, launch=SMALL)
    assert torch.equal(y, cupy_backend.mix_forward(x, logits, lam, u, None, launch=SMALL))


# (N, C, Cg, H, W), chunk, dtype, launch: bytes the emulated kernels move == mix_traffic's design
TRAFFIC_CASES = [
    ((2, 4, 4, 8, 8), None, BF16, WIDE),
    ((1, 6, 3, 7, 8), 3, F32, SMALL),     # gate planes shared by two channels of a CTA
    ((1, 4, 1, 6, 6), 2, F32, NARROW),    # gate gradients through the scratch and the epilogue
    ((3, 5, 5, 9, 12), None, F16, SMALL),  # partial last group
]


@pytest.mark.parametrize("shape, chunk, dtype, launch", TRAFFIC_CASES)
def test_bytes_moved_match_design(emulation, shape, chunk, dtype, launch):
    (x, logits, lam, u), dy = testing.mix_inputs(*shape, dtype, seed=1)
    design = cupy_backend.mix_traffic(*shape, dtype, launch=launch, smem_limit=launch.smem)
    emulation.reset()
    cupy_backend.mix_forward(x, logits, lam, u, chunk, launch=launch)
    assert sum(emulation.bytes_moved()) == design["fwd"]
    emulation.reset()
    cupy_backend.mix_backward(dy, x, logits, lam, u, chunk, (True,) * 4, launch=launch)
    assert sum(emulation.bytes_moved()) == design["bwd"]


def test_target_shapes_within_design_bar():
    """At the benchmark's shapes (C = 1152, bf16, H100/H200 shared memory) the kernels move at most
    1.15x the bytes of reading each input once and writing each output once, forward and backward."""
    for N, H, W in [(32, 16, 16), (8, 32, 32), (4, 64, 64), (1, 128, 128)]:
        t = cupy_backend.mix_traffic(N, 1152, 1152, H, W, BF16)
        assert t["fwd"] <= 1.15 * t["floor_fwd"] and t["bwd"] <= 1.15 * t["floor_bwd"], (N, H, W, t)


def test_argument_struct_layout(emulation_builds):
    """cupy_backend's ctypes mirror of struct Args has the C++ layout (size, geometry offset, and the
    15 pointers first, which the sanitizer driver relies on)."""
    lib = emulation_from(emulation_builds, "lib").lib
    assert lib.emu_args_size() == ctypes.sizeof(cupy_backend._Args)
    assert lib.emu_geo_offset() == cupy_backend._Args.geo.offset
    assert lib.emu_geo_size() == ctypes.sizeof(cupy_backend._GeoC)
    assert cupy_backend._Args.HW.offset == 15 * 8


def test_limits_are_clear_errors(emulation):
    """Lines longer than MAX_LINE, or maps whose plan needs more shared memory than allowed, are refused
    with the limit named (ops.py sends such shapes to the PyTorch backend)."""
    (x, logits, lam, u), _ = testing.mix_inputs(1, 2, 2, 2, cupy_backend.MAX_LINE + 1, F32)
    with pytest.raises(ValueError, match=r"lines of at most 1024 positions"):
        cupy_backend.mix_forward(x, logits, lam, u, None, launch=SMALL)
    (x, logits, lam, u), _ = testing.mix_inputs(1, 2, 2, 64, 64, F32)
    with pytest.raises(ValueError, match=r"within 8192 bytes of shared memory"):
        cupy_backend.mix_forward(x, logits, lam, u, None, launch=Launch(smem=8192))


def test_unavailable_reason_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    reason = cupy_backend.unavailable_reason()
    assert reason and ("CUDA" in reason or "CuPy" in reason)
    assert not cupy_backend.supports(1, 4, 4, 16, 16, BF16)
