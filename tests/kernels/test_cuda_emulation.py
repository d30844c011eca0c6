"""The CUDA kernels on the CPU: kernels/cuda/*.cu compiled by g++ (cuda_emulation.cpp) and driven through
cupy_backend's own plan, argument struct and allocation, against the float64 oracle, in both variants.

Covers the kernels' indexing, tiling, chunks, the asynchronous-copy pipeline (2 and 3 stages, row lines'
16-byte and column lines' 4-byte copies, the synchronous scalar path), compact gates (summed inside a CTA
and through the scratch epilogue), lines held by several lanes per position (R > 1) and by several warps,
partial last groups, the cluster's distributed-shared-memory sum and the portable variant's sum through
the global scratch (its CTAs in every order), fp32 / bf16 / fp16 rounding, the global bytes each launch
moves against `mix_traffic`, and the shared-memory bank conflicts of the plans at the target shapes.
Outputs start as NaN (torch's deterministic fill), so an element the kernels never write fails the
comparison. Speed and the GPU memory model are for tests/gpu.
"""

import ctypes

import pytest
import torch
from gspn_gen.kernels import cuda_plan, cupy_backend, testing
from gspn_gen.kernels.cuda_plan import ARCHS, VARIANTS, Launch

from tests.helpers import backend
from tests.kernels.emulation import SMALL, emulation_from

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
WIDE = Launch(loaders=32, scan_lanes=64, tile=8, smem=96 * 1024)   # tiles long enough for bf16 / fp16 vectors
NARROW = Launch(loaders=32, scan_lanes=16, tile=4, smem=96 * 1024)  # one or two planes per CTA
LINES = Launch(loaders=32, scan_lanes=128, tile=8, smem=96 * 1024)  # long lines of few planes on several warps
DEEP = Launch(loaders=64, scan_lanes=64, tile=8, stages=3, smem=96 * 1024)    # a 3-stage pipeline of vectors
SHALLOW = Launch(loaders=32, scan_lanes=64, tile=8, stages=2, smem=96 * 1024)  # a 2-stage pipeline

# (N, C, Cg, H, W), chunk, dtype, launch settings
MIX_CASES = [
    ((2, 4, 4, 5, 7), None, F32, SMALL),     # H != W, odd, one gate channel per channel, several planes per CTA
    ((1, 6, 3, 7, 8), 3, F32, SMALL),        # compact gates summed in the CTA, fp32 vectors, chunk not dividing
    ((1, 4, 1, 6, 6), 2, F32, NARROW),       # compact gates wider than a CTA's planes: scratch + epilogue
    ((2, 2, 2, 1, 9), None, F32, SMALL),     # H = 1
    ((1, 2, 1, 9, 1), 4, F32, SMALL),        # W = 1
    ((1, 2, 2, 37, 3), None, F32, SMALL),    # column lines longer than a warp: 2 positions per lane
    ((1, 2, 2, 3, 70), 5, F32, NARROW),      # row lines of 70 on one warp: 4 positions per lane
    ((1, 2, 2, 8, 11), 1, F32, SMALL),       # chunk 1: nothing propagates
    ((3, 5, 5, 17, 12), 6, F32, SMALL),      # 15 planes: a partial last group; chunk dividing W
    ((1, 2, 1, 4, 200), None, F32, NARROW),  # lines of 200: 8 positions per lane, fp32 vectors
    ((2, 8, 8, 16, 16), None, BF16, WIDE),   # bf16 16-byte row copies, 4-byte column copies
    ((1, 3, 3, 12, 8), 4, BF16, SMALL),      # bf16 scalar path, several tiles
    ((1, 4, 2, 8, 16), 6, F16, WIDE),        # fp16 vectors, compact gates
    ((1, 4, 4, 5, 6), None, F16, NARROW),    # fp16 scalar path
    ((1, 2, 2, 9, 70), 3, F32, LINES),       # row lines of 70 on 2 warps (2 positions per lane)
    ((1, 1, 1, 100, 7), None, BF16, LINES),  # column lines of 100 on 4 warps
    ((1, 2, 1, 40, 40), 7, F16, LINES),      # both kinds on 2 warps, compact gates
    ((2, 4, 4, 24, 32), 5, BF16, DEEP),      # 3 stages, several tiles of vectors in flight
    ((1, 3, 3, 20, 24), None, F16, SHALLOW),  # 2 stages
]


def _plan(shape, dtype, launch, backward=True, mix=True, vec_ok=True):
    N, C, Cg, H, W = shape
    return cuda_plan.plan(N, C, Cg, H, W, dtype.itemsize, backward, mix, vec_ok, launch, ARCHS["sm_90"])


def test_cases_cover_every_path():
    """The cases above reach every branch of the plan: gate modes, vectors, R values, warps per line,
    planes per CTA, partial groups, several tiles, both pipeline depths."""
    plans = [(_plan(shape, dtype, launch), shape) for shape, _, dtype, launch in MIX_CASES]
    assert {p.gmode for p, _ in plans} == {0, 1, 2}
    assert {p.V > 1 for p, _ in plans} == {False, True}
    assert {p.V for p, _ in plans if p.V > 1} == {4, 8}
    assert {p.R for p, _ in plans} == set(cuda_plan.R_VALUES)
    assert {g.W for p, _ in plans for g in p.geo} == set(cuda_plan.LINE_WARPS)
    assert any(g.W > 1 and g.P % (32 * g.W * p.R) for p, _ in plans for g in p.geo)  # a partly filled last warp
    assert any(p.lb > 1 for p, _ in plans) and any(p.lb == 1 for p, _ in plans)
    assert any((s[0] * s[1]) % p.lb for p, s in plans)                     # partial last group
    assert all(max(g.nt for g in p.geo) > 1 for p, _ in plans[:3])         # several tiles per scan
    assert {p.S for p, _ in plans if p.V > 1 and max(g.nt for g in p.geo) > 2} == {2, 3}
    # the backward's resident lookahead: none, some with vectors, and as far as the last tile
    assert any(g.D == 0 for p, _ in plans for g in p.geo) and any(g.D > 0 and p.V > 1 for p, _ in plans for g in p.geo)
    assert any(p.S - 1 + g.D >= g.nt - 1 > p.S for p, _ in plans for g in p.geo)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape, chunk, dtype, launch", MIX_CASES)
def test_mix_matches_oracle(emulation, shape, chunk, dtype, launch, variant):
    testing.check_mix(testing.backend_mix(backend(launch, variant)), shape, dtype, chunk,
                      seed=sum(shape) + (chunk or 0))


@pytest.mark.parametrize("shape, chunk, dtype, launch", [MIX_CASES[i] for i in (1, 10, 17)])
def test_variants_are_bitwise_identical(emulation, shape, chunk, dtype, launch):
    """The portable variant's sum through the global scratch adds the four directions in the cluster's
    order, whichever CTA of a group finishes last: its outputs and gradients equal the cluster's bit for
    bit with the CTAs of a group run together, one after another, or in reverse (so each CTA is once the
    last)."""
    inputs, dy = testing.mix_inputs(*shape, dtype, seed=7)
    want = testing.run(testing.backend_mix(backend(launch, "cluster")), inputs, dy, chunk)
    portable = testing.backend_mix(backend(launch, "portable"))
    for order in ("concurrent", "in order", "reversed"):
        emulation.set_order(order)
        try:
            got = testing.run(portable, inputs, dy, chunk)
        finally:
            emulation.set_order("concurrent")
        assert all(torch.equal(a, b) for a, b in zip(got, want)), order


@pytest.mark.parametrize("shape, chunk, dtype", [((1, 4, 2, 24, 32), 5, BF16), ((2, 3, 3, 20, 28), None, F32)])
def test_resident_lookahead_changes_nothing(emulation, shape, chunk, dtype):
    """The backward's first pass loading its resident tiles 0, 1, 3 or all tiles further ahead only moves
    copies earlier: the gradients are bitwise the same, and right."""
    inputs, dy = testing.mix_inputs(*shape, dtype, seed=5)
    got = {}
    for D in (0, 1, 3, 100):
        launch = Launch(loaders=32, scan_lanes=64, tile=16 // dtype.itemsize, stages=2, lookahead=D, smem=96 * 1024)
        assert all(g.D == D for g in _plan(shape, dtype, launch).geo)
        got[D] = testing.run(testing.backend_mix(backend(launch, "portable")), inputs, dy, chunk)
    assert all(torch.equal(a, b) for D in (1, 3, 100) for a, b in zip(got[D], got[0]))
    testing.check_mix(testing.backend_mix(backend(launch, "portable")), shape, dtype, chunk, inputs=(inputs, dy))


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
    mix = backend(NARROW, "portable")
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


def test_bitwise_reproducible_across_plans(emulation):
    """Fixed-order sums, no float atomics: two runs agree bit for bit, and so do plans with other planes
    per CTA, tiles and pipeline depths (the arithmetic of a pixel does not depend on the plan)."""
    inputs, dy = testing.mix_inputs(2, 6, 3, 9, 8, BF16, seed=4)
    runs = [testing.run(testing.backend_mix(backend(launch, "cluster")), inputs, dy, 4)
            for launch in (SMALL, SMALL, WIDE, DEEP)]
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


def test_misaligned_pointers_take_the_scalar_path(emulation):
    """A tensor whose data is not 16-byte aligned gets synchronous scalar copies (a misaligned
    asynchronous copy would be reported by the emulation) and the same result as aligned copies."""
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


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape, chunk, dtype, launch", TRAFFIC_CASES)
def test_bytes_moved_match_design(emulation, shape, chunk, dtype, launch, variant):
    (x, logits, lam, u), dy = testing.mix_inputs(*shape, dtype, seed=1)
    design = cupy_backend.mix_traffic(*shape, dtype, launch=launch, variant=variant)
    emulation.reset()
    cupy_backend.mix_forward(x, logits, lam, u, chunk, launch=launch, variant=variant)
    assert sum(emulation.bytes_moved()) == design["fwd"]
    emulation.reset()
    cupy_backend.mix_backward(dy, x, logits, lam, u, chunk, (True,) * 4, launch=launch, variant=variant)
    assert sum(emulation.bytes_moved()) == design["bwd"]


TARGETS = [(32, 16, 16, BF16), (8, 32, 32, BF16), (4, 64, 64, BF16), (1, 128, 128, BF16), (4, 64, 64, F32)]
# Target shapes whose backward plan does not fit a block's shared memory: gspn_mix falls to the PyTorch
# backend there when a gradient is needed (the forward alone still runs the kernels).
NO_BACKWARD_PLAN = {("sm_80", 1, 128, 128, BF16), ("sm_89", 1, 128, 128, BF16)}


@pytest.mark.parametrize("arch", ["sm_80", "sm_89", "sm_90"])
def test_target_shapes_have_plans_within_the_design_bar(arch):
    """At the benchmark's shapes (C = 1152) every architecture has forward and backward plans, except
    the listed backward ones; the cluster variant moves at most 1.15x the bytes of reading each input once
    and writing each output once, the portable one at most 1.5x through DRAM (its direction sum's reads
    come from L2 and are counted apart, `l2_reads`)."""
    device = ARCHS[arch]
    for N, H, W, dtype in TARGETS:
        for variant in (VARIANTS if device.sm >= 90 else ("portable",)):
            for backward in (False, True):
                d = cuda_plan.design(N, 1152, 1152, H, W, dtype, backward, variant, device)
                if (arch, N, H, W, dtype) in NO_BACKWARD_PLAN and backward:
                    assert d is None
                    continue
                assert d is not None, (arch, N, H, W, dtype, variant, backward)
                bar = 1.15 if variant == "cluster" else 1.5
                assert d["dram_x_floor"] <= bar, (arch, N, H, W, dtype, variant, backward, d["dram_x_floor"])
                assert d["inflight_sm"] > 0 and d["ctas_per_sm"] >= 1
                if backward:  # the first pass's copies reach INFLIGHT_SM per SM, or run to the last tile
                    p = cuda_plan.plan(N, 1152, 1152, H, W, dtype.itemsize, True, True, True, Launch(), device)
                    reach = d["inflight_sm_by_phase"][0] >= cuda_plan.INFLIGHT_SM
                    assert reach or all(p.S - 1 + g.D >= g.nt - 1 for g in p.geo), (arch, N, H, dtype, p.geo)
                    assert reach or arch != "sm_90", (N, H, dtype, d["inflight_sm_by_phase"])


# One group of the production plan per target shape (N * C = planes per CTA), its shared-memory warp
# accesses counted: at most 2-way bank conflicts.
BANK_CASES = [("sm_90", "cluster", 32, 16, 16, BF16), ("sm_90", "cluster", 4, 64, 64, BF16),
              ("sm_90", "portable", 4, 64, 64, F32), ("sm_80", "portable", 8, 32, 32, BF16),
              ("sm_89", "portable", 1, 128, 128, BF16)]


@pytest.mark.parametrize("arch, variant, N, H, W, dtype", BANK_CASES)
def test_shared_memory_bank_conflicts_at_most_two_way(emulation, monkeypatch, arch, variant, N, H, W, dtype):
    device = ARCHS[arch]
    monkeypatch.setattr(cupy_backend, "_device", lambda _: device)
    for backward in (False, True):
        p = cuda_plan.plan(N, 1152, 1152, H, W, dtype.itemsize, backward, True, True, Launch(), device)
        if p is None:
            assert (arch, N, H, W, dtype) in NO_BACKWARD_PLAN and backward
            continue
        (x, logits, lam, u), dy = testing.mix_inputs(1, p.lb, p.lb, H, W, dtype, seed=3)
        emulation.reset()
        emulation.count_banks(True)
        try:
            if backward:
                cupy_backend.mix_backward(dy, x, logits, lam, u, None, (True,) * 4, variant=variant)
            else:
                cupy_backend.mix_forward(x, logits, lam, u, None, variant=variant)
        finally:
            emulation.count_banks(False)
        stats = emulation.bank_stats()
        worst = {site: w for site, (w, _) in stats["sites"].items() if w > 2}
        assert stats["accesses"] > 1000 and stats["worst"] <= 2, (backward, worst, stats["by_degree"])


def test_bank_counter_sees_a_conflict(emulation, monkeypatch):
    """The counter itself: with a plane pitch that is a multiple of 32 words (no padding), the write
    phase's 16-byte column reads of a 64-row plane hit the same banks, 4-way or worse."""
    real = cuda_plan._geo.__wrapped__

    def unpadded(col, P, *rest):
        g = real(col, P, *rest)
        return g.__class__(**{**g.__dict__, "Pp": 64}) if P == 64 else g

    monkeypatch.setattr(cuda_plan, "_geo", unpadded)
    cuda_plan.plan.cache_clear()
    try:
        (x, logits, lam, u), _ = testing.mix_inputs(1, 1, 1, 64, 64, F32, seed=2)
        emulation.reset()
        emulation.count_banks(True)
        cupy_backend.mix_forward(x, logits, lam, u, None, launch=Launch(scan_lanes=32), variant="cluster")
    finally:
        emulation.count_banks(False)
        cuda_plan.plan.cache_clear()
    assert emulation.bank_stats()["worst"] >= 4


def test_argument_struct_layout(emulation_builds):
    """cupy_backend's ctypes mirror of struct Args has the C++ layout (size, geometry offset, and the
    17 pointers first, which the sanitizer driver relies on)."""
    lib = emulation_from(emulation_builds, "lib").lib
    assert lib.emu_args_size() == ctypes.sizeof(cupy_backend._Args)
    assert lib.emu_geo_offset() == cupy_backend._Args.geo.offset
    assert lib.emu_geo_size() == ctypes.sizeof(cupy_backend._GeoC)
    assert cupy_backend._Args.HW.offset == cupy_backend._POINTER_FIELDS * 8 == 17 * 8


def test_limits_are_clear_errors(emulation):
    """Lines longer than MAX_LINE, or maps whose plan needs more shared memory than allowed, are refused
    with the limit named (ops.py sends such shapes to the PyTorch backend)."""
    (x, logits, lam, u), _ = testing.mix_inputs(1, 2, 2, 2, cuda_plan.MAX_LINE + 1, F32)
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
