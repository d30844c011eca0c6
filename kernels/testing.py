"""Random inputs for the GSPN ops, the tolerance rule every backend is held to, and GPU timing (tests and
benchmarks).

Tolerance (flash-attention's rule, DESIGN.md §3 "Correctness bar"): against the float64 oracle
(`reference.py`), a backend's largest error on each output and gradient must be at most twice the
largest error of the oracle itself run on the same low-precision inputs, plus a small floor relative
to the tensor's scale (for tensors the low-precision oracle gets exactly right).
"""

from __future__ import annotations

import functools
import statistics
import time

import torch

from .reference import gspn_mix_reference, gspn_scan_reference, stability_gates

__all__ = ["FLOOR", "MIX_NAMES", "SCAN_NAMES", "assert_matches", "backend_mix", "backend_scan", "check_mix",
           "check_scan", "copy_bandwidth", "mix_inputs", "run", "scan_inputs", "time_ms"]

FLOOR = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 5e-4}
MIX_NAMES = ("y", "dx", "dgate_logits", "dlam", "du")
SCAN_NAMES = ("h", "dx", "dlam", "dg_up", "dg_mid", "dg_down")


def mix_inputs(N: int, C: int, Cg: int, H: int, W: int, dtype=torch.float32, device="cpu", seed: int = 0):
    """([x, gate_logits, lam, u], dy) of gspn_mix's shapes, fresh per seed, drawn on the CPU.

    x, u, dy ~ N(0, 1); gate logits ~ N(0, 4) (gates far from uniform); lam ~ U(0.5, 1.5).
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=gen)
    logits = 2 * torch.randn(N, 4, 3, Cg, H, W, generator=gen)
    lam = 0.5 + torch.rand(N, 4, C, H, W, generator=gen)
    u = torch.randn(N, 4, C, H, W, generator=gen)
    dy = torch.randn(N, C, H, W, generator=gen)
    return [t.to(device=device, dtype=dtype) for t in (x, logits, lam, u)], dy.to(device=device, dtype=dtype)


def scan_inputs(N: int, C: int, Cg: int, H: int, W: int, dtype=torch.float32, device="cpu", seed: int = 0):
    """([x, lam, g_up, g_mid, g_down], dy) of gspn_scan's shapes (gates normalised), fresh per seed."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=gen)
    lam = 0.5 + torch.rand(N, C, H, W, generator=gen)
    gates = stability_gates(2 * torch.randn(N, 3, Cg, H, W, generator=gen, dtype=torch.float64))
    dy = torch.randn(N, C, H, W, generator=gen)
    return [t.to(device=device, dtype=dtype) for t in (x, lam, *gates)], dy.to(device=device, dtype=dtype)


def run(fn, inputs, dy, chunk, dtype=None) -> list[torch.Tensor]:
    """[output, gradient of every input] of fn(*inputs, chunk), on fresh leaves (cast to dtype if given)."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in inputs]
    out = fn(*leaves, chunk)
    grads = torch.autograd.grad(out, leaves, dy.to(out.dtype))
    return [out.detach(), *grads]


def assert_matches(names, ours, exact, lowp, dtype, context: str) -> None:
    """Each tensor of `ours` within 2x the low-precision oracle's error (+ floor) of the float64 `exact`."""
    for name, a, e, r in zip(names, ours, exact, lowp):
        assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)} ({context})"
        assert a.dtype == dtype, f"{name}: dtype {a.dtype}, expected {dtype} ({context})"
        e = e.double().cpu()
        a, r = a.double().cpu(), r.double().cpu()
        assert torch.isfinite(a).all(), f"{name}: non-finite values ({context})"
        err = (a - e).abs().max().item()
        ref_err = (r - e).abs().max().item()
        bound = 2 * ref_err + FLOOR[dtype] * max(1.0, e.abs().max().item())
        assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g} (oracle in {dtype}: {ref_err:.3g}; {context})"


def _check(fn, reference, make_inputs, names, shape, dtype, chunk, device, seed, inputs) -> list[torch.Tensor]:
    ins, dy = make_inputs(*shape, dtype, device, seed) if inputs is None else inputs
    ours = run(fn, ins, dy, chunk)
    exact = run(reference, [t.cpu() for t in ins], dy.cpu().double(), chunk, torch.float64)
    lowp = run(reference, [t.cpu() for t in ins], dy.cpu(), chunk)
    assert_matches(names, ours, exact, lowp, dtype, f"shape {shape}, {dtype}, chunk {chunk}")
    return ours


def check_mix(fn, shape, dtype, chunk, device="cpu", seed: int = 0, inputs=None) -> list[torch.Tensor]:
    """fn (gspn_mix's signature, chunk last) against the oracle: y and all four gradients."""
    return _check(fn, gspn_mix_reference, mix_inputs, MIX_NAMES, shape, dtype, chunk, device, seed, inputs)


def check_scan(fn, shape, dtype, chunk, device="cpu", seed: int = 0, inputs=None) -> list[torch.Tensor]:
    """fn (gspn_scan's signature, chunk last) against the oracle: h and all five gradients."""
    return _check(fn, gspn_scan_reference, scan_inputs, SCAN_NAMES, shape, dtype, chunk, device, seed, inputs)


class _BackendMix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, backend, x, gate_logits, lam, u, chunk):
        ctx.save_for_backward(x, gate_logits, lam, u)
        ctx.backend, ctx.chunk = backend, chunk
        return backend.mix_forward(x, gate_logits, lam, u, chunk)

    @staticmethod
    def backward(ctx, dy):
        grads = ctx.backend.mix_backward(dy.contiguous(), *ctx.saved_tensors, ctx.chunk, ctx.needs_input_grad[1:5])
        return (None, *grads, None)


class _BackendScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, backend, x, lam, g_up, g_mid, g_down, chunk):
        ctx.save_for_backward(x, lam, g_up, g_mid, g_down)
        ctx.backend, ctx.chunk = backend, chunk
        return backend.scan_forward(x, lam, g_up, g_mid, g_down, chunk)

    @staticmethod
    def backward(ctx, dh):
        grads = ctx.backend.scan_backward(dh.contiguous(), *ctx.saved_tensors, ctx.chunk, ctx.needs_input_grad[1:6])
        return (None, *grads, None)


def backend_mix(backend):
    """gspn_mix's signature (chunk last) over a backend module's mix_forward / mix_backward, with autograd.

    Lets a test drive one backend directly, on inputs ops.py would route elsewhere (e.g. the CUDA host code
    over the CPU emulation of the kernels).
    """
    return lambda x, gate_logits, lam, u, chunk=None: _BackendMix.apply(
        backend, *(t.contiguous() for t in (x, gate_logits, lam, u)), chunk)


def backend_scan(backend):
    """gspn_scan's signature (chunk last) over a backend module's scan_forward / scan_backward, with autograd."""
    return lambda x, lam, g_up, g_mid, g_down, chunk=None: _BackendScan.apply(
        backend, *(t.contiguous() for t in (x, lam, g_up, g_mid, g_down)), chunk)


# ---------------------------------------------------------------------------------------------
# GPU timing (the benchmarks and the GPU check's smoke step)


def time_ms(fn, budget_s: float = 0.3, max_reps: int = 50) -> float:
    """Median milliseconds of fn() by CUDA events, after warm-up; reps sized to about budget_s."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    reps = int(max(5, min(max_reps, budget_s / max(time.perf_counter() - t0, 1e-6))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def copy_bandwidth(nbytes: int = 2**31) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    buffers = [torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_() for _ in range(2)]
    ms = time_ms(functools.partial(buffers[1].copy_, buffers[0]), budget_s=0.2)
    buffers.clear()
    torch.cuda.empty_cache()
    return 2 * nbytes / (ms * 1e-3)
