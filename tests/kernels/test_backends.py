"""The CPU backends against the oracle: the PyTorch backend (kernels/torch_backend.py) and the compiled
CPU kernel (kernels/cpu_backend.py), outputs and every gradient, many shapes, every dtype, with the
tolerance rule of gspn_gen.kernels.testing."""

import pytest
import torch
from gspn_gen.kernels import cpu_backend, torch_backend
from gspn_gen.kernels.testing import backend_mix, backend_scan, check_mix, check_scan

NO_CPU_KERNEL = cpu_backend.unavailable_reason()
BACKENDS = [pytest.param(torch_backend, id="torch"),
            pytest.param(cpu_backend, id="cpu", marks=pytest.mark.skipif(
                NO_CPU_KERNEL is not None, reason=f"needs a C++ compiler for the CPU kernel: {NO_CPU_KERNEL}"))]

# (N, C, Cg, H, W), chunk: H != W, H = 1, W = 1, 1x1, odd sizes, compact gates, chunk 1 / dividing /
# not dividing / larger than the map
MIX_CASES = [
    ((2, 4, 2, 5, 7), None),
    ((1, 3, 3, 4, 4), None),
    ((1, 3, 1, 1, 6), 4),
    ((2, 2, 1, 6, 1), 2),
    ((1, 1, 1, 1, 1), None),
    ((2, 6, 2, 7, 4), 3),
    ((1, 2, 1, 3, 5), 1),
    ((1, 2, 2, 5, 3), 10),
    ((3, 8, 8, 9, 10), 4),
    ((1, 4, 2, 17, 9), None),   # the blocked 8x8 transposes with ragged edges
    ((1, 3, 3, 16, 24), 5),
    ((2, 4, 1, 8, 8), 8),
    ((1, 24, 12, 40, 33), None),  # CPU kernel: groups of 8 interleaved planes and a partial one
    ((1, 100, 100, 4, 5), 2),     # CPU kernel: a group of 64 planes (lines of 256) and a partial one
]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, chunk", MIX_CASES)
def test_mix_matches_oracle(shape, chunk, dtype, backend):
    check_mix(backend_mix(backend), shape, dtype, chunk, seed=sum(shape) + (chunk or 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, chunk", [((2, 4, 2, 5, 7), None), ((1, 3, 3, 1, 6), 4), ((2, 6, 3, 6, 6), 4),
                                          ((1, 2, 2, 9, 1), None), ((1, 4, 1, 5, 5), 1), ((1, 4, 2, 11, 19), 7)])
def test_scan_matches_oracle(shape, chunk, dtype, backend):
    check_scan(backend_scan(backend), shape, dtype, chunk, seed=sum(shape))


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_gradients_match_oracle(backend):
    """Each gradient asked for alone equals the oracle's; the others are not computed."""
    from gspn_gen.kernels.reference import gspn_mix_reference
    from gspn_gen.kernels.testing import mix_inputs

    (x, logits, lam, u), dy = mix_inputs(1, 4, 2, 5, 6, torch.float64, seed=9)
    expected = torch.autograd.grad(gspn_mix_reference(*(t.requires_grad_() for t in (x, logits, lam, u)), 2),
                                   (x, logits, lam, u), dy)
    for wanted in range(4):
        needs = tuple(i == wanted for i in range(4))
        grads = backend.mix_backward(dy, x.detach(), logits.detach(), lam.detach(), u.detach(), 2, needs)
        assert [g is not None for g in grads] == list(needs)
        torch.testing.assert_close(grads[wanted], expected[wanted], rtol=1e-10, atol=1e-10)
