"""The CuPy CUDA kernels against the float64 reference, on the GPU (skipped without CUDA and CuPy).

Outputs and every gradient on fresh random inputs over many shapes (H != W, H = 1, W = 1, odd,
longer lines than a block, chunk None / 1 / dividing / not dividing) and all three dtypes, with
flash-attention's tolerance rule (conftest.py); buffers pre-filled with NaN; non-contiguous inputs;
CUDA-graph capture and replay of forward + backward; the large-line shared-memory opt-in.
"""

import pytest
import torch
from gspn_gen.kernels import cupy_backend
from gspn_gen.kernels.cupy_backend import gspn_mix_cuda, gspn_scan_cuda


def _reason() -> str | None:
    if not torch.cuda.is_available():
        return "CUDA is not available (torch.cuda.is_available() is False)"
    return cupy_backend.cupy_unavailable_reason()


_REASON = _reason()
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(_REASON is not None, reason=f"needs CUDA and CuPy: {_REASON}")]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DEV = "cuda"

# (N, C, Cg, H, W), chunk
MIX_CASES = [
    ((2, 8, 8, 8, 8), None),      # square, one gate channel per channel
    ((2, 8, 8, 8, 8), 3),         # chunk not dividing
    ((2, 6, 3, 5, 7), None),      # H != W, odd, compact gates
    ((2, 6, 3, 5, 7), 2),
    ((1, 4, 4, 1, 9), 4),         # H = 1
    ((1, 4, 2, 9, 1), None),      # W = 1
    ((3, 5, 5, 17, 12), 5),
    ((1, 8, 2, 33, 20), None),    # several planes per block, several tiles per scan
    ((1, 4, 4, 12, 10), 1),       # chunk 1: nothing propagates
    ((1, 2, 1, 300, 3), 7),       # column lines longer than a block of threads
    ((1, 2, 2, 3, 300), None),    # row lines longer than a block of threads
    ((2, 16, 4, 64, 64), None),   # benchmark-like tiles
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, chunk", MIX_CASES)
def test_mix_matches_reference(kc, shape, chunk, dtype):
    kc.check_mix(gspn_mix_cuda, shape, dtype, chunk, DEV, seed=31 * sum(shape) + (chunk or 0))


SCAN_CASES = [
    ((2, 8, 8, 8, 8), None),
    ((2, 6, 3, 5, 7), 3),
    ((1, 4, 4, 1, 9), None),
    ((1, 4, 2, 9, 1), 2),
    ((1, 8, 2, 33, 20), 6),
    ((1, 2, 1, 300, 5), None),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, chunk", SCAN_CASES)
def test_scan_matches_reference(kc, shape, chunk, dtype):
    kc.check_scan(gspn_scan_cuda, shape, dtype, chunk, DEV, seed=31 * sum(shape) + (chunk or 0))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cg", [6, 2])
def test_outputs_fully_written(kc, monkeypatch, dtype, cg):
    """Every buffer the kernels must fill starts as NaN, so an unwritten element fails the comparison."""
    monkeypatch.setattr(cupy_backend, "_new_output",
                        lambda shape, dt, device: torch.full(shape, float("nan"), dtype=dt, device=device))
    kc.check_mix(gspn_mix_cuda, (2, 6, cg, 9, 7), dtype, 4, DEV, seed=1)
    kc.check_scan(gspn_scan_cuda, (2, 6, cg, 9, 7), dtype, None, DEV, seed=2)


def test_non_contiguous_inputs(kc):
    N, C, Cg, H, W = 2, 6, 3, 7, 5
    (x, logits, lam, u), dy = kc.mix_inputs(N, C, Cg, H, W, torch.float32, DEV, seed=3)
    x_nc = x.transpose(2, 3).contiguous().transpose(2, 3)                  # W-major strides
    logits_nc = torch.cat([logits, logits], -1)[..., :W]                   # row stride 2W
    lam_nc = lam.transpose(1, 2).contiguous().transpose(1, 2)              # (N, C, 4, H, W) storage
    u_nc = torch.stack([u, u], -1)[..., 0]                                  # element stride 2
    dy_nc = dy.transpose(2, 3).contiguous().transpose(2, 3)
    assert not any(t.is_contiguous() for t in (x_nc, logits_nc, lam_nc, u_nc, dy_nc))
    kc.check_mix(gspn_mix_cuda, (N, C, Cg, H, W), torch.float32, 2, DEV, seed=0,
                 inputs=([x_nc, logits_nc, lam_nc, u_nc], dy_nc))
    (x, lam, *gates), dy = kc.scan_inputs(N, C, Cg, H, W, torch.float32, DEV, seed=4)
    gates_nc = [g.transpose(2, 3).contiguous().transpose(2, 3) for g in gates]
    kc.check_scan(gspn_scan_cuda, (N, C, Cg, H, W), torch.float32, None, DEV, seed=0,
                  inputs=([x.transpose(2, 3).contiguous().transpose(2, 3), lam, *gates_nc], dy))


def test_inference_matches_training_path(kc):
    (x, logits, lam, u), _ = kc.mix_inputs(2, 8, 4, 12, 9, torch.bfloat16, DEV, seed=5)
    with torch.no_grad():
        y_inf = gspn_mix_cuda(x, logits, lam, u, 4)
    y_train = gspn_mix_cuda(x.requires_grad_(), logits, lam, u, 4)
    torch.testing.assert_close(y_inf, y_train.detach(), rtol=1e-2, atol=1e-2)


def test_partial_gradients(kc):
    """Only the gradients asked for come back (ctx.needs_input_grad), and each is right."""
    from gspn_gen.kernels.reference import gspn_mix_reference

    (x, logits, lam, u), dy = kc.mix_inputs(2, 6, 2, 7, 9, torch.float32, DEV, seed=6)
    for wanted in range(4):
        leaves = [t.clone().requires_grad_(i == wanted) for i, t in enumerate((x, logits, lam, u))]
        grad = torch.autograd.grad(gspn_mix_cuda(*leaves, 3), leaves[wanted], dy)[0]
        exact = [t.double().requires_grad_(i == wanted) for i, t in enumerate((x, logits, lam, u))]
        ref = torch.autograd.grad(gspn_mix_reference(*exact, 3), exact[wanted], dy.double())[0]
        torch.testing.assert_close(grad.double(), ref, rtol=1e-4, atol=1e-4)


def test_shared_memory_opt_in(kc):
    """Lines of 1200 positions need more than 48 KiB of shared memory per block in backward."""
    plan = cupy_backend._plan(1, 2, 2, 1200, mix=True, backward=True)
    assert plan.smem > 48 * 1024
    kc.check_mix(gspn_mix_cuda, (1, 2, 1, 2, 1200), torch.float32, None, DEV, seed=7)


@pytest.mark.parametrize("op", ["mix", "scan"])
def test_cuda_graph_replay(kc, op):
    """Forward + backward captured in a CUDA graph replay to the eager result on new inputs."""
    shape = (2, 8, 4, 11, 13)
    make = kc.mix_inputs if op == "mix" else kc.scan_inputs
    fn = gspn_mix_cuda if op == "mix" else gspn_scan_cuda
    inputs, dy = make(*shape, torch.float32, DEV, seed=8)
    leaves = [t.clone().requires_grad_() for t in inputs]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compilation, allocator) off the capture
        for _ in range(2):
            fn(*leaves, 3).backward(dy)
    torch.cuda.current_stream().wait_stream(side)
    for t in leaves:
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*leaves, 3)
        out.backward(dy)

    new_inputs, new_dy = make(*shape, torch.float32, DEV, seed=9)
    with torch.no_grad():
        for t, v in zip(leaves, new_inputs):
            t.copy_(v)
        dy.copy_(new_dy)
    graph.replay()
    torch.cuda.synchronize()
    eager = kc.run(fn, new_inputs, new_dy, 3)
    for got, want in zip([out, *(t.grad for t in leaves)], eager):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_public_api_dispatch(kc):
    from gspn_gen.kernels import available_backends, gspn_mix

    assert "cuda" in available_backends()
    (x, logits, lam, u), _ = kc.mix_inputs(1, 4, 2, 6, 5, torch.float32, DEV, seed=10)
    with torch.no_grad():
        torch.testing.assert_close(gspn_mix(x, logits, lam, u, backend="cuda"), gspn_mix_cuda(x, logits, lam, u),
                                   rtol=1e-6, atol=1e-6)
