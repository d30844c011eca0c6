"""The CUDA kernels on the GPU against the float64 oracle (skipped without CUDA; failing instead under
GSPN_REQUIRE_CUDA=1, see conftest.py).

Outputs and every gradient with the tolerance rule of gspn_gen.kernels.testing (at most twice the error of
the oracle run in the low precision, plus a floor), through the public ops (backend="cuda": the variant
that passed its trial on this GPU) at many shapes and all three dtypes, and through the backend with other
launch settings so that every path of the kernels runs on the hardware (gate modes, scalar and
asynchronous copies, 1 to 8 positions per lane, 2 and 3 pipeline stages, the largest shared-memory plans).
The portable variant is bitwise equal to the cluster variant on every case where both run. fp32: the
kernels compute what the CPU emulation computes (IEEE divisions and an FMA-built exp, no fast-math
instruction; tests/kernels/test_cuda_compile.py checks the PTX), so they meet the same bound as there; the
GPU only differs where its compiler fuses a multiply and an add into one FMA, which rounds less. Also:
bitwise determinism over two runs, non-contiguous inputs, only the gradients asked for, the PyTorch
fallback for maps beyond the kernels' limits, no local memory in any compiled kernel, and CUDA-graph
capture of a dtype's first call.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gspn_gen.kernels import cuda_plan, cupy_backend, gspn_mix, gspn_scan, testing
from gspn_gen.kernels.cuda_plan import Launch

from tests.helpers import backend

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
DEV = "cuda"


def mix_cuda(x, gate_logits, lam, u, chunk=None):
    return gspn_mix(x, gate_logits, lam, u, chunk, backend="cuda")


def scan_cuda(x, lam, g_up, g_mid, g_down, chunk=None):
    return gspn_scan(x, lam, g_up, g_mid, g_down, chunk, backend="cuda")


def _both_variants():
    if cupy_backend.unavailable_reason("cluster") is not None:
        pytest.skip(f"the cluster variant does not run here: {cupy_backend.unavailable_reason('cluster')}")


# (N, C, Cg, H, W), chunk, dtype
MIX_CASES = [
    ((2, 8, 8, 8, 8), None, F32),           # square, one gate channel per channel, 16-byte copies
    ((2, 8, 8, 8, 8), 3, BF16),             # chunk not dividing
    ((2, 6, 3, 5, 7), None, F32),           # H != W, odd, compact gates, scalar copies
    ((2, 6, 3, 5, 7), 2, F16),
    ((1, 4, 4, 1, 9), 4, F32),              # H = 1
    ((1, 4, 2, 9, 1), None, BF16),          # W = 1
    ((3, 5, 5, 17, 12), 6, F32),            # partial last group, chunk dividing W
    ((1, 8, 2, 33, 20), None, F16),         # lines longer than a warp, compact gates
    ((1, 4, 4, 12, 10), 1, BF16),           # chunk 1: nothing propagates
    ((1, 2, 1, 200, 3), 7, F32),            # column lines of 200
    ((1, 2, 2, 3, 250), None, F32),         # row lines of 250 (the fp32 case once off by fast math)
    ((1, 2, 2, 3, 250), None, BF16),
    ((2, 16, 16, 64, 64), 5, BF16),         # benchmark-like
    ((1, 4, 4, 128, 128), None, BF16),      # the largest bf16 target
]


@pytest.mark.parametrize("shape, chunk, dtype", MIX_CASES)
def test_mix_matches_oracle(shape, chunk, dtype):
    testing.check_mix(mix_cuda, shape, dtype, chunk, DEV, seed=31 * sum(shape) + (chunk or 0))


@pytest.mark.parametrize("shape, chunk, dtype", MIX_CASES)
def test_portable_variant_equals_cluster(shape, chunk, dtype):
    """The portable variant's direction sum through the global scratch adds in the cluster's order: the
    same outputs and gradients, bit for bit."""
    _both_variants()
    inputs, dy = testing.mix_inputs(*shape, dtype, DEV, seed=sum(shape))
    cluster = testing.run(lambda *a: gspn_mix(*a, backend="cuda-cluster"), inputs, dy, chunk)
    portable = testing.run(lambda *a: gspn_mix(*a, backend="cuda-portable"), inputs, dy, chunk)
    assert all(torch.equal(a, b) for a, b in zip(cluster, portable))


@pytest.mark.parametrize("shape, chunk, dtype", [MIX_CASES[i] for i in (2, 6, 10, 12)])
def test_portable_variant_matches_oracle(shape, chunk, dtype):
    testing.check_mix(testing.backend_mix(backend(Launch(), "portable")), shape, dtype, chunk, DEV,
                      seed=7 * sum(shape))


SCAN_CASES = [
    ((2, 8, 8, 8, 8), None, F32),
    ((2, 6, 3, 5, 7), 3, BF16),
    ((1, 4, 4, 1, 9), None, F16),
    ((1, 4, 2, 9, 1), 2, F32),
    ((1, 8, 2, 33, 20), 6, BF16),
    ((1, 2, 1, 200, 5), None, F32),
]


@pytest.mark.parametrize("shape, chunk, dtype", SCAN_CASES)
def test_scan_matches_oracle(shape, chunk, dtype):
    testing.check_scan(scan_cuda, shape, dtype, chunk, DEV, seed=31 * sum(shape) + (chunk or 0))


# Launch settings that take other paths than the defaults: several planes and tiles per CTA, compact
# gates through the scratch and epilogue, tiles too short for vectors, 2 and 3 stages, the largest plans,
# the backward's resident copies 5 tiles ahead.
LAUNCH_CASES = [
    ((1, 6, 3, 7, 8), 3, F32, Launch(loaders=32, scan_lanes=64, tile=4, smem=96 * 1024)),
    ((1, 4, 1, 6, 6), 2, BF16, Launch(loaders=32, scan_lanes=16, tile=4, smem=96 * 1024)),
    ((2, 8, 2, 16, 16), None, F16, Launch(loaders=64, scan_lanes=32, tile=4, stages=2)),
    ((1, 4, 2, 64, 64), 5, BF16, Launch(loaders=128, scan_lanes=64, tile=32, stages=3, smem=113 * 1024)),
    ((1, 2, 2, 104, 104), None, F32, Launch()),   # the largest fp32 square on H100 / H200 (bf16: 128, above)
    ((2, 4, 4, 48, 40), None, BF16, Launch(loaders=64, scan_lanes=64, tile=8, stages=2, lookahead=4)),  # resident tiles
]


@pytest.mark.parametrize("shape, chunk, dtype, launch", LAUNCH_CASES)
def test_launch_settings_match_oracle(shape, chunk, dtype, launch):
    if not cupy_backend.supports(*shape, dtype):
        pytest.skip(f"{shape} {dtype} exceeds this GPU's shared memory per block (the PyTorch backend runs it)")
    testing.check_mix(testing.backend_mix(backend(launch)), shape, dtype, chunk, DEV, seed=sum(shape))
    testing.check_scan(testing.backend_scan(backend(launch)), shape, dtype, chunk, DEV, seed=sum(shape) + 1)


@pytest.mark.parametrize("shape, chunk, dtype", [((4, 64, 64, 32, 32), None, BF16), ((1, 8, 2, 20, 24), 5, F16)])
def test_bitwise_reproducible(shape, chunk, dtype):
    """Fixed-order sums, no float atomics: outputs and gradients agree bit for bit over two runs, and
    across plans (compact gates through the scratch here)."""
    inputs, dy = testing.mix_inputs(*shape, dtype, DEV, seed=3)
    first, second = (testing.run(mix_cuda, inputs, dy, chunk) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    narrow = testing.backend_mix(backend(Launch(loaders=32, scan_lanes=16, tile=4)))
    third = testing.run(narrow, inputs, dy, chunk)
    assert all(torch.equal(a, b) for a, b in zip(first, third))


def test_non_contiguous_inputs():
    N, C, Cg, H, W = 2, 6, 3, 7, 8
    (x, logits, lam, u), dy = testing.mix_inputs(N, C, Cg, H, W, F32, DEV, seed=3)
    x_nc = x.transpose(2, 3).contiguous().transpose(2, 3)                  # W-major strides
    logits_nc = torch.cat([logits, logits], -1)[..., :W]                   # row stride 2W
    lam_nc = lam.transpose(1, 2).contiguous().transpose(1, 2)              # (N, C, 4, H, W) storage
    u_nc = torch.stack([u, u], -1)[..., 0]                                 # element stride 2
    assert not any(t.is_contiguous() for t in (x_nc, logits_nc, lam_nc, u_nc))
    testing.check_mix(mix_cuda, (N, C, Cg, H, W), F32, 2, DEV, inputs=([x_nc, logits_nc, lam_nc, u_nc], dy))


def test_only_requested_gradients():
    (x, logits, lam, u), dy = testing.mix_inputs(2, 6, 2, 7, 9, F32, DEV, seed=6)
    full = cupy_backend.mix_backward(dy, x, logits, lam, u, 3, (True,) * 4)
    for wanted in range(4):
        needs = tuple(i == wanted for i in range(4))
        grads = cupy_backend.mix_backward(dy, x, logits, lam, u, 3, needs)
        assert [g is not None for g in grads] == list(needs)
        assert torch.equal(grads[wanted], full[wanted])
        leaves = [t.clone().requires_grad_(i == wanted) for i, t in enumerate((x, logits, lam, u))]
        grad = torch.autograd.grad(mix_cuda(*leaves, 3), leaves[wanted], dy)[0]
        assert torch.equal(grad, full[wanted])


def test_fallback_beyond_the_limits():
    """Maps beyond the kernels' limits (lines longer than MAX_LINE, planes too large for the shared
    memory) run on the PyTorch backend with backend="auto"; backend="cuda" refuses them clearly."""
    long_line = (1, 2, 2, 4, cuda_plan.MAX_LINE + 8)
    too_large = (1, 2, 2, 128, 128)  # fp32: more than a CTA's shared memory in backward
    assert not cupy_backend.supports(*long_line, F32)
    assert not cupy_backend.supports(*too_large, F32)
    testing.check_mix(lambda *a: gspn_mix(*a, backend="auto"), too_large, F32, None, DEV)
    for shape in (long_line, too_large):
        (x, logits, lam, u), _ = testing.mix_inputs(*shape, F32, DEV)
        x.requires_grad_()
        with pytest.raises(ValueError, match="backend='cuda' does not support x of shape"):
            gspn_mix(x, logits, lam, u, backend="cuda")


def test_target_shapes_supported():
    """Forward and backward plans at the benchmark's shapes, as cuda_plan plans them for this GPU's
    architecture (the backward of 1 x 128 x 128 bf16 needs more than the 163 / 99 KB per block of sm_80 /
    sm_86 / sm_89: it falls to the PyTorch backend there, the forward alone still runs the kernels)."""
    limits = cupy_backend._device_limits(torch.cuda.current_device())
    for N, H, W, dtype in [(32, 16, 16, BF16), (8, 32, 32, BF16), (4, 64, 64, BF16), (1, 128, 128, BF16),
                           (4, 64, 64, F32)]:
        assert cupy_backend.supports(N, 1152, 1152, H, W, dtype, backward=False)
        expected = cuda_plan.fits(N, 1152, 1152, H, W, dtype, limits)
        assert cupy_backend.supports(N, 1152, 1152, H, W, dtype) == expected
        if limits.smem_block >= 232448:
            assert expected, (N, H, W, dtype)


def test_compiled_kernels_fit_their_launches():
    """No kernel uses local memory (a spill or a run-time indexed register array), and each takes as many
    threads per CTA as its default plans ask at the benchmark shapes (registers permitting)."""
    index = torch.cuda.current_device()
    variant = cupy_backend.variant()
    kernels = cupy_backend._kernels(index, variant)
    for name, kernel in kernels.items():
        assert kernel.local_size_bytes == 0, (name, kernel.attributes)
    for dtype in (F32, BF16, F16):
        for N, H, W in [(32, 16, 16), (8, 32, 32), (4, 64, 64), (1, 128, 128), (1, 8, 256)]:
            for bwd in (False, True):
                regs = cupy_backend._regs(torch.device("cuda", index), variant, dtype, bwd, True)
                plan = cuda_plan.plan(N, 1152, 1152, H, W, dtype.itemsize, bwd, True, True, Launch(),
                                      cupy_backend._device_limits(index), regs)
                if plan is None:
                    continue
                name = cupy_backend.kernel_name(cupy_backend._MIX_KERNELS[variant][int(bwd)], dtype, plan.R)
                assert plan.threads <= kernels[name].max_threads_per_block, (name, plan)


def test_the_trial_chose_a_variant():
    """The first use ran the trial: the cluster variant on sm_90+, else the portable one."""
    sm = cupy_backend._capability(torch.cuda.current_device())
    assert cupy_backend.variant() == ("cluster" if sm >= 90 else "portable")


CAPTURE = """
import sys
import torch
from gspn_gen.kernels import gspn_mix, testing

if sys.argv[1] == "after-fp32":  # any earlier call compiled and loaded every dtype's kernels
    inputs, dy = testing.mix_inputs(1, 2, 2, 4, 4, torch.float32, "cuda")
    gspn_mix(*inputs, backend="cuda")
    torch.cuda.synchronize()
shape = (2, 8, 4, 11, 13)
inputs, dy = testing.mix_inputs(*shape, torch.bfloat16, "cuda", seed=8)
leaves = [t.clone().requires_grad_() for t in inputs]
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):
    out = gspn_mix(*leaves, 3, backend="cuda")
    grads = torch.autograd.grad(out, leaves, dy)
new, new_dy = testing.mix_inputs(*shape, torch.bfloat16, "cuda", seed=9)
with torch.no_grad():
    for t, v in zip(leaves, new):
        t.copy_(v)
    dy.copy_(new_dy)
graph.replay()
torch.cuda.synchronize()
eager = testing.run(lambda *a: gspn_mix(*a, backend="cuda"), new, new_dy, 3)
for got, want in zip([out, *grads], eager):
    assert torch.equal(got, want), (got - want).abs().max()
print("graph replay matches eager")
"""


# The strict variant last: a failure cannot hide the other results.
@pytest.mark.parametrize("before", ["after-fp32", "first-in-process"])
def test_cuda_graph_capture_of_a_first_call(tmp_path, before):
    """In a fresh process, forward + backward of the first bf16 call captured in a CUDA graph (after an
    fp32 call, or as the very first call of the process, which then compiles and loads the kernels inside
    the capture and launches no trial there), replayed on new inputs: exactly the eager result. The
    trial runs in the process itself here (this session's trial process already vouched for the GPU)."""
    script = tmp_path / "capture.py"
    script.write_text(CAPTURE)
    env = {k: v for k, v in os.environ.items() if k != "GSPN_REQUIRE_CUDA"}
    env["GSPN_CUDA_TRIAL"] = "inprocess"
    done = subprocess.run([sys.executable, str(script), before], capture_output=True, text=True, timeout=300,
                          env=env, cwd=Path(__file__).resolve().parents[2], check=False)
    assert done.returncode == 0 and "matches eager" in done.stdout, done.stderr[-4000:]
