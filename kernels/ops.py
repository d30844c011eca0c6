"""Public GSPN ops (DESIGN.md §3): inputs are checked once here, then run by one backend.

Backends, each with the same four functions (mix_forward, mix_backward, scan_forward, scan_backward):
  "cuda"       the CuPy kernels (`cupy_backend.py`): CUDA tensors in float32, float16 or bfloat16, in the
               variant that passed its trial on the device ("cuda-cluster", sm_90; "cuda-portable", sm_80+);
  "cpu"        the compiled CPU kernel (`cpu_backend.py`, built on first use): CPU tensors, any float dtype;
  "torch"      the pure-PyTorch path (`torch_backend.py`): any device and float dtype, the last fallback;
  "reference"  the oracle (`reference.py`): short and slow, for checking the others;
  "auto"       "cuda" for CUDA tensors the kernels support when CuPy works there, "cpu" for CPU tensors
               when the CPU kernel builds here, else "torch" (a fall is announced once, with its reason);
               the environment variable GSPN_BACKEND (any name above) replaces "auto".

`gspn_mix` and `gspn_scan` are torch.library custom ops (`gspn_gen::gspn_mix`, `gspn_gen::gspn_scan`) with
a fake (meta) implementation, so torch.compile traces models through them without a graph break, and a
registered autograd formula that keeps only the op's inputs: every backend recomputes its hidden states in
backward, so one call costs no activation memory beyond what it was given.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings

import torch
from torch import Tensor

from . import reference, torch_backend

__all__ = ["available_backends", "gspn_mix", "gspn_scan"]

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BACKENDS = ("auto", "cuda", "cuda-cluster", "cuda-portable", "cpu", "torch", "reference")
_CUDA_NAMES = {"cuda": None, "cuda-cluster": "cluster", "cuda-portable": "portable"}  # name -> variant


class BackendFallbackWarning(RuntimeWarning):
    """A faster backend cannot run here; the op runs on the next one (said once per backend and reason)."""


@functools.cache
def _announce(backend: str, reason: str) -> None:
    warnings.warn(f"gspn_gen.kernels: the {backend} backend is unavailable ({reason}); "
                  "using the PyTorch backend", BackendFallbackWarning, stacklevel=_outside_this_package())


def _outside_this_package() -> int:
    """The stack level of the first caller outside gspn_gen.kernels (where a warning is useful)."""
    here, frame, level = os.path.dirname(os.path.abspath(__file__)), sys._getframe(1), 1
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == here:
        frame, level = frame.f_back, level + 1
    return level


@functools.cache
def _cuda_backend():
    """(the cupy_backend module, None) when the CUDA kernels can run here, else (None, reason)."""
    from . import cupy_backend  # imports without CuPy; CuPy itself is imported on first use

    reason = cupy_backend.unavailable_reason()
    return (cupy_backend, None) if reason is None else (None, reason)


@functools.cache
def _cpu_backend():
    """(the cpu_backend module, None) when the compiled CPU kernel builds and loads here, else (None, reason)."""
    from . import cpu_backend

    reason = cpu_backend.unavailable_reason()
    return (cpu_backend, None) if reason is None else (None, reason)


def available_backends() -> list[str]:
    """["reference", "torch"], plus "cpu" when the CPU kernel builds here and "cuda" when CuPy and a GPU
    make the CUDA kernels usable."""
    return (["reference", "torch"] + (["cpu"] if _cpu_backend()[0] is not None else [])
            + (["cuda"] if _cuda_backend()[0] is not None else []))


class _Oracle:
    """The reference as a backend: forward without a graph, backward by autograd through a recomputation."""

    @staticmethod
    def mix_forward(x, gate_logits, lam, u, chunk):
        with torch.no_grad():
            return reference.gspn_mix_reference(x, gate_logits, lam, u, chunk)

    @staticmethod
    def mix_backward(dy, x, gate_logits, lam, u, chunk, needs):
        return _Oracle._grads(reference.gspn_mix_reference, dy, (x, gate_logits, lam, u), chunk, needs)

    @staticmethod
    def scan_forward(x, lam, g_up, g_mid, g_down, chunk):
        with torch.no_grad():
            return reference.gspn_scan_reference(x, lam, g_up, g_mid, g_down, chunk)

    @staticmethod
    def scan_backward(dh, x, lam, g_up, g_mid, g_down, chunk, needs):
        return _Oracle._grads(reference.gspn_scan_reference, dh, (x, lam, g_up, g_mid, g_down), chunk, needs)

    @staticmethod
    def _grads(fn, dout, inputs, chunk, needs):
        # torch.func.vjp: plain autograd is switched off inside a custom op's implementation
        wanted = [i for i, need in enumerate(needs) if need]

        def of_wanted(*leaves):
            args = list(inputs)
            for i, leaf in zip(wanted, leaves):
                args[i] = leaf
            return fn(*args, chunk)

        _, vjp = torch.func.vjp(of_wanted, *(inputs[i] for i in wanted))
        grads = iter(vjp(dout))
        return tuple(next(grads) if need else None for need in needs)


def _module(name: str):
    if name == "cuda":
        return _cuda_backend()[0]
    if name in _CUDA_NAMES:
        return _cupy_backend().bound(_CUDA_NAMES[name])
    if name == "cpu":
        return _cpu_backend()[0]
    return torch_backend if name == "torch" else _Oracle


def _cupy_backend():
    from . import cupy_backend

    return cupy_backend


@torch.compiler.assume_constant_result
def _cpu_unavailable(announce: bool) -> str:
    """"" when the compiled CPU kernel runs here, else why not (announced once if asked). torch.compile
    calls this once while tracing instead of tracing into the build."""
    reason = _cpu_backend()[1] or ""
    if reason and announce:
        _announce("compiled CPU", reason)
    return reason


def _resolve_cpu(backend: str, x: Tensor) -> str:
    """"cpu" when the compiled CPU kernel runs x, else "torch" (auto, announced) or an error (asked for)."""
    if x.device.type != "cpu":
        if backend == "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got x on {x.device}; use backend='auto'")
        return "torch"
    reason = _cpu_unavailable(backend == "auto")
    if not reason:
        return "cpu"
    if backend == "cpu":
        raise RuntimeError(f"backend='cpu' is unavailable: {reason}")
    return "torch"


def _resolve(backend: str, x: Tensor, cg: int, backward: bool = True) -> str:
    """The backend that runs x: a name of _BACKENDS other than "auto". backward: whether the kernels must
    also run the op's backward (a plan for both), or its forward only (no gradient needed)."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto" and os.environ.get("GSPN_BACKEND", "auto") not in ("", "auto"):
        backend = os.environ["GSPN_BACKEND"]
        if backend not in _BACKENDS:
            raise ValueError(f"the environment variable GSPN_BACKEND must be one of {_BACKENDS}, got {backend!r}")
    if backend in ("torch", "reference"):
        return backend
    if backend == "cpu" or (backend == "auto" and x.device.type == "cpu"):
        return _resolve_cpu(backend, x)
    on_gpu = x.device.type == "cuda"
    shape = (*x.shape[:2], cg, *x.shape[2:])
    if backend == "auto":
        if not on_gpu or x.dtype not in _CUDA_DTYPES:
            return "torch"
        module, reason = _cuda_backend()
        if module is None:
            _announce("CUDA", reason)
            return "torch"
        return "cuda" if module.supports(*shape, x.dtype, backward=backward) else "torch"
    if not on_gpu:
        raise ValueError(f"backend={backend!r} needs CUDA tensors, got x on {x.device}; "
                         "move the inputs to a GPU or use backend='auto'")
    if x.dtype not in _CUDA_DTYPES:
        raise ValueError(f"backend={backend!r} supports float32, float16 and bfloat16, got x of dtype {x.dtype}; "
                         "use backend='torch' for float64")
    module, reason = _cuda_backend()
    variant = _CUDA_NAMES[backend]
    if module is not None and variant is not None:
        reason = module.unavailable_reason(variant)
    if module is None or reason is not None:
        raise RuntimeError(f"backend={backend!r} is unavailable: {reason}")
    if not module.supports(*shape, x.dtype, variant_=variant, backward=backward):
        raise ValueError(f"backend={backend!r} does not support x of shape {tuple(x.shape)} in {x.dtype} (the map "
                         "does not fit the kernels' shared-memory plan, see gspn_gen.kernels.cuda_plan); "
                         "use backend='auto' to run it with the PyTorch backend")
    return backend


def _needs_backward(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


# ---------------------------------------------------------------------------------------------
# Validation: every message names the tensor and what was expected
# ---------------------------------------------------------------------------------------------

def _check_tensor(name: str, t, ndim: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(t).__name__}")
    if t.dim() != ndim or 0 in t.shape:
        raise ValueError(f"{name} must have shape {layout} with no zero sizes, got {tuple(t.shape)}")
    if t.dtype not in _DTYPES:
        raise ValueError(f"{name} must be float32, float64, bfloat16 or float16, got {t.dtype}")


def _check_shape(name: str, t: Tensor, expected: tuple, layout: str) -> None:
    if tuple(t.shape) != expected:
        raise ValueError(f"{name} must have shape {layout} = {expected}, got {tuple(t.shape)}")


def _check_like_x(named: dict, x: Tensor) -> None:
    for name, t in named.items():
        if t.dtype != x.dtype:
            raise ValueError(f"{name} has dtype {t.dtype}, expected {x.dtype} like x (all inputs share one dtype)")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, expected {x.device} like x (all inputs share one device)")


def _check_gate_channels(name: str, cg: int, c: int) -> None:
    if c % cg != 0:
        raise ValueError(f"{name} has Cg = {cg} gate channels, which must divide C = {c} (the channels of x)")


def _check_chunk(chunk) -> int:
    """chunk as the custom ops take it: 0 for a global scan."""
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be None (global scan) or an int >= 1, got {chunk!r}")
    return chunk or 0


# ---------------------------------------------------------------------------------------------
# Custom ops: forward, backward and fake implementations
# ---------------------------------------------------------------------------------------------

def _or_empty(grads, like):
    """Custom ops return tensors only: an absent gradient travels as an empty tensor."""
    return [g if g is not None else t.new_empty(0) for g, t in zip(grads, like)]


@torch.library.custom_op("gspn_gen::gspn_mix", mutates_args=())
def _mix_op(x: Tensor, gate_logits: Tensor, lam: Tensor, u: Tensor, chunk: int, backend: str) -> Tensor:
    return _module(backend).mix_forward(x, gate_logits, lam, u, chunk or None)


@_mix_op.register_fake
def _(x, gate_logits, lam, u, chunk, backend):
    return torch.empty_like(x)


@torch.library.custom_op("gspn_gen::gspn_mix_backward", mutates_args=())
def _mix_backward_op(dy: Tensor, x: Tensor, gate_logits: Tensor, lam: Tensor, u: Tensor, chunk: int,
                     backend: str, needs: list[bool]) -> list[Tensor]:
    inputs = (x, gate_logits, lam, u)
    return _or_empty(_module(backend).mix_backward(dy, *inputs, chunk or None, tuple(needs)), inputs)


@_mix_backward_op.register_fake
def _(dy, x, gate_logits, lam, u, chunk, backend, needs):
    return [torch.empty_like(t) if need else t.new_empty(0) for t, need in zip((x, gate_logits, lam, u), needs)]


@torch.library.custom_op("gspn_gen::gspn_scan", mutates_args=())
def _scan_op(x: Tensor, lam: Tensor, g_up: Tensor, g_mid: Tensor, g_down: Tensor, chunk: int,
             backend: str) -> Tensor:
    return _module(backend).scan_forward(x, lam, g_up, g_mid, g_down, chunk or None)


@_scan_op.register_fake
def _(x, lam, g_up, g_mid, g_down, chunk, backend):
    return torch.empty_like(x)


@torch.library.custom_op("gspn_gen::gspn_scan_backward", mutates_args=())
def _scan_backward_op(dh: Tensor, x: Tensor, lam: Tensor, g_up: Tensor, g_mid: Tensor, g_down: Tensor,
                      chunk: int, backend: str, needs: list[bool]) -> list[Tensor]:
    inputs = (x, lam, g_up, g_mid, g_down)
    return _or_empty(_module(backend).scan_backward(dh, *inputs, chunk or None, tuple(needs)), inputs)


@_scan_backward_op.register_fake
def _(dh, x, lam, g_up, g_mid, g_down, chunk, backend, needs):
    return [torch.empty_like(t) if need else t.new_empty(0) for t, need in zip((x, lam, g_up, g_mid, g_down), needs)]


def _save_inputs(ctx, inputs, output):
    *tensors, ctx.chunk, ctx.backend = inputs
    ctx.save_for_backward(*tensors)


def _mix_autograd(ctx, dy):
    needs = list(ctx.needs_input_grad[:4])
    grads = _mix_backward_op(dy.contiguous(), *ctx.saved_tensors, ctx.chunk, ctx.backend, needs)
    return (*(g if need else None for g, need in zip(grads, needs)), None, None)


def _scan_autograd(ctx, dh):
    needs = list(ctx.needs_input_grad[:5])
    grads = _scan_backward_op(dh.contiguous(), *ctx.saved_tensors, ctx.chunk, ctx.backend, needs)
    return (*(g if need else None for g, need in zip(grads, needs)), None, None)


_mix_op.register_autograd(_mix_autograd, setup_context=_save_inputs)
_scan_op.register_autograd(_scan_autograd, setup_context=_save_inputs)


# ---------------------------------------------------------------------------------------------
# Public ops
# ---------------------------------------------------------------------------------------------

def gspn_scan(x: Tensor, lam: Tensor, g_up: Tensor, g_mid: Tensor, g_down: Tensor, chunk: int | None = None,
              backend: str = "auto") -> Tensor:
    """One left->right GSPN scan with given, already normalised gates (DESIGN.md §3, "One direction").

    h[:, :, i, w] = lam * x + g_up * h[i-1, w-1] + g_mid * h[i, w-1] + g_down * h[i+1, w-1],
    with h zero left of column 0 and outside rows 0..H-1.

    Args:
        x: (N, C, H, W) input.
        lam: (N, C, H, W) input weight.
        g_up, g_mid, g_down: (N, Cg, H, W) gates of the neighbours at rows i-1, i, i+1 of the
            previous column; Cg divides C and gate channel j serves x channels j*k .. j*k+k-1, k = C/Cg.
        chunk: None for a global scan, or K >= 1 to restart the recursion at every w % K == 0.
        backend: "auto", "cuda", "cuda-cluster", "cuda-portable", "cpu", "torch" or "reference" (module
            docstring).

    Returns:
        h: (N, C, H, W), in x's dtype (accumulated in fp32, or fp64 for fp64 inputs).
    """
    _check_tensor("x", x, 4, "(N, C, H, W)")
    n, c, height, width = x.shape
    _check_tensor("lam", lam, 4, "(N, C, H, W)")
    _check_shape("lam", lam, (n, c, height, width), "(N, C, H, W)")
    gates = {"g_up": g_up, "g_mid": g_mid, "g_down": g_down}
    for name, g in gates.items():
        _check_tensor(name, g, 4, "(N, Cg, H, W)")
        _check_shape(name, g, (n, g_up.shape[1], height, width), "(N, Cg, H, W) like g_up")
    _check_gate_channels("g_up", g_up.shape[1], c)
    _check_like_x({"lam": lam, **gates}, x)
    chunk = _check_chunk(chunk)
    name = _resolve(backend, x, g_up.shape[1], _needs_backward(x, lam, g_up, g_mid, g_down))
    return _scan_op(*(t.contiguous() for t in (x, lam, g_up, g_mid, g_down)), chunk, name)


def gspn_mix(x: Tensor, gate_logits: Tensor, lam: Tensor, u: Tensor, chunk: int | None = None,
             backend: str = "auto") -> Tensor:
    """GSPN four-direction propagation, the attention replacement (DESIGN.md §3, "Four directions").

    y = sum over d of u_d * scan_d(lam_d * x, gates_d), all in the image frame, for the directions
    d = 0 left->right, 1 right->left, 2 top->bottom, 3 bottom->top. A pixel's three neighbours lie
    on the previous line of its scan (a column for d = 0, 1, a row for d = 2, 3) at offsets -1, 0, +1
    along that line; their gates are sigmoid(gate_logits) normalised over the neighbours that exist.

    Args:
        x: (N, C, H, W) input.
        gate_logits: (N, 4, 3, Cg, H, W) logits per direction d and offset k = 0, 1, 2 (-1, 0, +1);
            Cg divides C and gate channel j serves x channels j*k .. j*k+k-1, k = C/Cg.
        lam: (N, 4, C, H, W) input weight per direction.
        u: (N, 4, C, H, W) output weight per direction.
        chunk: None for global scans, or K >= 1: every scan restarts at the line blocks
            [0, K), [K, 2K), ... along its axis (the same blocks for both directions of an axis).
        backend: "auto", "cuda", "cuda-cluster", "cuda-portable", "cpu", "torch" or "reference" (module
            docstring).

    Returns:
        y: (N, C, H, W), in x's dtype (accumulated in fp32, or fp64 for fp64 inputs). Backward keeps only
        the inputs and recomputes the rest; it is not itself differentiable.
    """
    _check_tensor("x", x, 4, "(N, C, H, W)")
    n, c, height, width = x.shape
    _check_tensor("gate_logits", gate_logits, 6, "(N, 4, 3, Cg, H, W)")
    cg = gate_logits.shape[3]
    _check_shape("gate_logits", gate_logits, (n, 4, 3, cg, height, width), "(N, 4, 3, Cg, H, W)")
    _check_gate_channels("gate_logits", cg, c)
    for name, t in (("lam", lam), ("u", u)):
        _check_tensor(name, t, 5, "(N, 4, C, H, W)")
        _check_shape(name, t, (n, 4, c, height, width), "(N, 4, C, H, W)")
    _check_like_x({"gate_logits": gate_logits, "lam": lam, "u": u}, x)
    chunk = _check_chunk(chunk)
    name = _resolve(backend, x, cg, _needs_backward(x, gate_logits, lam, u))
    return _mix_op(*(t.contiguous() for t in (x, gate_logits, lam, u)), chunk, name)
