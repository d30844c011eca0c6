"""Helpers shared by the CUDA kernel tests and their CPU emulation: inputs and the tolerance rule.

Tolerance (flash-attention's rule): against the float64 reference, the kernel's largest error must
be at most twice the largest error of the reference itself run in the same low precision, plus a
small floor relative to the output's scale (for tensors the low-precision reference gets exact).
"""

from types import SimpleNamespace

import pytest
import torch
from gspn_gen.kernels.reference import gspn_mix_reference, gspn_scan_reference, stability_gates

FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 5e-4}
MIX_NAMES = ("y", "dx", "dgate_logits", "dlam", "du")
SCAN_NAMES = ("h", "dx", "dlam", "dg_up", "dg_mid", "dg_down")


def mix_inputs(N, C, Cg, H, W, dtype, device, seed):
    """x (N, C, H, W), gate_logits (N, 4, 3, Cg, H, W), lam, u (N, 4, C, H, W) and dy, fresh per seed."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=gen)
    logits = 2 * torch.randn(N, 4, 3, Cg, H, W, generator=gen)
    lam = 0.5 + torch.rand(N, 4, C, H, W, generator=gen)
    u = torch.randn(N, 4, C, H, W, generator=gen)
    dy = torch.randn(N, C, H, W, generator=gen)
    return [t.to(device=device, dtype=dtype) for t in (x, logits, lam, u)], dy.to(device=device, dtype=dtype)


def scan_inputs(N, C, Cg, H, W, dtype, device, seed):
    """x, lam (N, C, H, W), normalised g_up, g_mid, g_down (N, Cg, H, W) and dy, fresh per seed."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=gen)
    lam = 0.5 + torch.rand(N, C, H, W, generator=gen)
    gates = stability_gates(2 * torch.randn(N, 3, Cg, H, W, generator=gen))
    dy = torch.randn(N, C, H, W, generator=gen)
    return [t.to(device=device, dtype=dtype) for t in (x, lam, *gates)], dy.to(device=device, dtype=dtype)


def run(fn, inputs, dy, chunk, dtype=None):
    """Output and the gradients of all inputs (fresh leaves, cast to dtype when given)."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in inputs]
    out = fn(*leaves, chunk)
    grads = torch.autograd.grad(out, leaves, dy.to(out.dtype))
    return [out.detach(), *grads]


def assert_matches(names, ours, exact, lowp, dtype, context):
    """Every tensor of `ours` within 2x the low-precision reference's error (+ floor) of `exact`."""
    for name, a, e, r in zip(names, ours, exact, lowp):
        assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)} ({context})"
        e = e.double()
        err = (a.double() - e).abs().max().item()
        ref_err = (r.double() - e).abs().max().item()
        bound = 2 * ref_err + FLOOR[dtype] * max(1.0, e.abs().max().item())
        assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g} (reference {ref_err:.3g}; {context})"


def check_mix(fn, shape, dtype, chunk, device, seed, inputs=None):
    """Compare fn (gspn_mix signature) with the reference: outputs and all four gradients."""
    ins, dy = mix_inputs(*shape, dtype, device, seed) if inputs is None else inputs
    ours = run(fn, ins, dy, chunk)
    exact = run(gspn_mix_reference, ins, dy.double(), chunk, torch.float64)
    lowp = run(gspn_mix_reference, ins, dy, chunk)
    assert_matches(MIX_NAMES, ours, exact, lowp, dtype, f"shape {shape}, {dtype}, chunk {chunk}")
    return ours


def check_scan(fn, shape, dtype, chunk, device, seed, inputs=None):
    """Compare fn (gspn_scan signature) with the reference: output and all five gradients."""
    ins, dy = scan_inputs(*shape, dtype, device, seed) if inputs is None else inputs
    ours = run(fn, ins, dy, chunk)
    exact = run(gspn_scan_reference, ins, dy.double(), chunk, torch.float64)
    lowp = run(gspn_scan_reference, ins, dy, chunk)
    assert_matches(SCAN_NAMES, ours, exact, lowp, dtype, f"shape {shape}, {dtype}, chunk {chunk}")
    return ours


@pytest.fixture
def kc():
    """The helpers above, for the test modules of this folder."""
    return SimpleNamespace(mix_inputs=mix_inputs, scan_inputs=scan_inputs, run=run, assert_matches=assert_matches,
                           check_mix=check_mix, check_scan=check_scan, MIX_NAMES=MIX_NAMES, SCAN_NAMES=SCAN_NAMES)
