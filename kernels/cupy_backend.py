"""CUDA backend of the GSPN propagation: the kernels in ``cuda/*.cu``, compiled at run time by CuPy.

``gspn_scan_cuda`` and ``gspn_mix_cuda`` take the arguments of ``gspn_scan`` / ``gspn_mix`` (see
``ops.py``; validation happens there) and return the same tensors as the reference, with autograd.
Sources are compiled once per device and dtype with NVRTC (``cupy.RawModule``), kernels launch on
PyTorch's current stream (so CUDA-graph capture and stream semantics follow PyTorch), and tensors
pass as raw device pointers of contiguous tensors. CuPy is imported lazily: importing this module
needs neither CuPy nor a GPU, and ``cupy_unavailable_reason()`` says why the backend cannot run.

Launch geometry (see ``cuda/gspn_common.cuh``): a block of ``THREADS`` threads owns whole planes
(n, c) of one direction and walks the scan axis in shared-memory tiles of ``ts`` steps; ``_plan``
picks the largest tile that fits ``SMEM_BUDGET``. gspn_mix runs its four directions in one launch
(grid.y = direction) that adds u_d * h_d into an fp32 buffer with atomics; in training it also keeps
the fp32 hidden states (N, 4, C, H, W) for backward (16 bytes per element of x, written once, read
once), which is the price of not recomputing the scan. Backward is one launch too (plus, with
compact gates Cg < C, a small epilogue for the gate logits), and fp32 accumulators are cast to the
input dtype by PyTorch.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["cupy_unavailable_reason", "gspn_mix_cuda", "gspn_scan_cuda"]

THREADS = 256                 # threads per block
SMEM_BUDGET = 48 * 1024       # bytes of shared memory a block aims for (more is opted into only when forced)
TILE_MAX = 32                 # most scan steps staged per tile
_DEFAULT_SMEM = 48 * 1024     # dynamic shared memory a kernel gets without opting in
_FWD_ARRAYS, _FWD_CARRY = 4, 2 + 4  # staged (Q x ts) fp32 arrays; per-position words (carry + table)
_BWD_ARRAYS, _BWD_CARRY = 5, 6 + 4  # ... of the backward kernels

_CUDA_DIR = Path(__file__).with_name("cuda")
_SOURCES = ("gspn_common.cuh", "gspn_forward.cu", "gspn_backward.cu")
_KERNELS = ("gspn_mix_fwd", "gspn_scan_fwd", "gspn_mix_bwd", "gspn_scan_bwd", "gspn_mix_gate_grad")
_DTYPE_TAGS = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_INSTALL_HINT = "pip install 'gspn-gen[cuda13]' (or 'gspn-gen[cuda12]' for a CUDA 12 driver)"


# ---------------------------------------------------------------------------------------------
# CuPy, compilation, launch


def _import_cupy():
    import cupy  # optional dependency, imported on first use

    return cupy


@functools.cache
def cupy_unavailable_reason() -> str | None:
    """None when the CUDA kernels can run here, else a one-line reason (with the fix when there is one)."""
    try:
        cupy = _import_cupy()
    except ImportError:
        return f"CuPy is not installed: {_INSTALL_HINT}"
    except Exception as err:  # noqa: BLE001  (a broken CuPy install raises other errors at import)
        return f"CuPy failed to import ({type(err).__name__}: {_first_line(err)}); reinstall it: {_INSTALL_HINT}"
    if not torch.cuda.is_available():
        return "no CUDA device is visible to PyTorch (torch.cuda.is_available() is False)"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "CuPy sees no CUDA device"
    except Exception as err:  # noqa: BLE001  (driver errors come in several types)
        return f"CuPy cannot use the CUDA driver ({_first_line(err)}); install the CuPy build for it: {_INSTALL_HINT}"
    try:
        _kernels(torch.cuda.current_device(), "F32")
    except Exception as err:  # noqa: BLE001  (NVRTC and loader errors come in several types)
        return f"the GSPN CUDA kernels failed to compile: {_first_line(err)}"
    return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _source() -> str:
    """The kernel sources as one translation unit (the header inlined, so CuPy's cache sees every line)."""
    parts = []
    for name in _SOURCES:
        lines = (_CUDA_DIR / name).read_text().splitlines()
        kept = [ln for ln in lines if ln.strip() not in ('#include "gspn_common.cuh"', "#pragma once")]
        parts.append(f'#line 1 "{name}"\n' + "\n".join(kept))
    return "\n".join(parts) + "\n"


def _name_expressions(tag: str) -> list[str]:
    return [f"{kernel}<{tag}>" for kernel in _KERNELS]


@functools.cache
def _kernels(device_index: int, tag: str) -> dict:
    """Compile (NVRTC, cached on disk by CuPy) and load the kernels for one device and dtype tag."""
    cupy = _import_cupy()
    names = _name_expressions(tag)
    with cupy.cuda.Device(device_index):
        module = cupy.RawModule(code=_source(), options=("-std=c++17",), name_expressions=names)
        return {kernel: module.get_function(name) for kernel, name in zip(_KERNELS, names)}


class _StreamRef:
    """A CUDA stream handle speaking the CUDA stream protocol (for ``cupy.cuda.Stream.from_external``)."""

    def __init__(self, handle: int):
        self.handle = handle

    def __cuda_stream__(self):
        return (0, self.handle)


@functools.lru_cache(maxsize=64)
def _wrap_stream(handle: int, device_index: int):
    """CuPy's view of a PyTorch stream. ExternalStream (deprecated in CuPy 14, still the path that
    records the device) while it exists, else ``Stream.from_external``."""
    cupy = _import_cupy()
    if hasattr(cupy.cuda, "ExternalStream"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return cupy.cuda.ExternalStream(handle, device_index)
    return cupy.cuda.Stream.from_external(_StreamRef(handle))


def _cupy_stream(device: torch.device):
    return _wrap_stream(torch.cuda.current_stream(device).cuda_stream, device.index)


_SMEM_OPTED: dict[tuple[int, int], int] = {}


def _launch(kernel, grid: tuple[int, int], smem: int, args: tuple, device: torch.device) -> None:
    cupy = _import_cupy()
    with cupy.cuda.Device(device.index):
        if smem > _DEFAULT_SMEM and _SMEM_OPTED.get((id(kernel), device.index), 0) < smem:
            runtime = cupy.cuda.runtime
            limit = runtime.deviceGetAttribute(runtime.cudaDevAttrMaxSharedMemoryPerBlockOptin, device.index)
            if smem > limit:
                raise ValueError(
                    f"gspn CUDA kernel needs {smem} bytes of shared memory per block for these map sizes, "
                    f"more than the device's {limit}; use backend='reference' or smaller H/W"
                )
            kernel.max_dynamic_shared_size_bytes = smem
            _SMEM_OPTED[(id(kernel), device.index)] = smem
        with _cupy_stream(device):
            kernel(grid, (THREADS,), args, shared_mem=smem)


def _ptr(t: torch.Tensor | None) -> np.uint64:
    return np.uint64(0 if t is None else t.data_ptr())


def _i32(*values: int) -> tuple[np.int32, ...]:
    return tuple(np.int32(v) for v in values)


def _new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a tensor the kernels write completely (tests patch this to pre-fill NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------
# Launch geometry


@dataclass(frozen=True)
class _Plan:
    grid: tuple[int, int]
    smem: int
    lb_col: int
    ts_col: int
    lb_row: int
    ts_row: int


def _tiles(P: int, L: int, col: bool, arrays: int, carry: int,
           threads: int, budget: int, tile_max: int) -> tuple[int, int, int]:
    """(planes per block, steps per tile, shared bytes) for lines of P positions scanned over L steps."""
    lb = max(1, threads // P)
    q = lb * P

    def smem(ts: int) -> int:
        stride = (ts | 1) if col else ts
        return 4 * (arrays * q * stride + carry * q)

    ts = max(1, min(tile_max, L))
    while ts > 1 and smem(ts) > budget:
        ts -= 1
    return lb, ts, smem(ts)


def _plan(N: int, C: int, H: int, W: int, mix: bool, backward: bool) -> _Plan:
    """Launch geometry (reads THREADS, SMEM_BUDGET and TILE_MAX at call time, so tests can vary them)."""
    return _plan_for(N, C, H, W, mix, backward, THREADS, SMEM_BUDGET, TILE_MAX)


@functools.lru_cache(maxsize=256)
def _plan_for(N: int, C: int, H: int, W: int, mix: bool, backward: bool,
              threads: int, budget: int, tile_max: int) -> _Plan:
    arrays, carry = (_BWD_ARRAYS, _BWD_CARRY) if backward else (_FWD_ARRAYS, _FWD_CARRY)
    lb_c, ts_c, sm_c = _tiles(H, W, True, arrays, carry, threads, budget, tile_max)
    blocks = math.ceil(N * C / lb_c)
    if not mix:
        return _Plan((blocks, 1), sm_c, lb_c, ts_c, 1, 1)
    lb_r, ts_r, sm_r = _tiles(W, H, False, arrays, carry, threads, budget, tile_max)
    blocks = max(blocks, math.ceil(N * C / lb_r))
    return _Plan((blocks, 4), max(sm_c, sm_r), lb_c, ts_c, lb_r, ts_r)


def _check(tensors: dict, device: torch.device, dtype: torch.dtype) -> None:
    if device.type != "cuda":
        raise ValueError(f"the CUDA backend needs CUDA tensors, got x on {device}")
    if dtype not in _DTYPE_TAGS:
        raise ValueError(f"the CUDA backend supports float32, float16 and bfloat16, got x of dtype {dtype}")
    for name, t in tensors.items():
        if t.device != device or t.dtype != dtype:
            raise ValueError(f"{name} is {t.dtype} on {t.device}, expected {dtype} on {device} like x")
    if math.prod(tensors["x"].shape[:2]) >= 2**31:
        raise ValueError(f"x has {math.prod(tensors['x'].shape[:2])} planes (N * C), at most 2**31 - 1 supported")


def _chunk(chunk: int | None) -> int:
    return 0 if chunk is None else int(chunk)


# ---------------------------------------------------------------------------------------------
# gspn_mix: four directions fused


def _mix_forward(x, gate_logits, lam, u, chunk, keep_h: bool):
    """y (N, C, H, W) and, with keep_h, the fp32 hidden states (N, 4, C, H, W)."""
    N, C, H, W = x.shape
    Cg = gate_logits.shape[3]
    y32 = torch.zeros((N, C, H, W), dtype=torch.float32, device=x.device)  # accumulated by 4 directions
    h = _new_output((N, 4, C, H, W), torch.float32, x.device) if keep_h else None
    if x.numel() > 0:
        plan = _plan(N, C, H, W, mix=True, backward=False)
        kernel = _kernels(x.device.index, _DTYPE_TAGS[x.dtype])["gspn_mix_fwd"]
        args = (_ptr(x), _ptr(gate_logits), _ptr(lam), _ptr(u), _ptr(y32), _ptr(h),
                *_i32(N, C, Cg, H, W, _chunk(chunk), plan.lb_col, plan.ts_col, plan.lb_row, plan.ts_row))
        _launch(kernel, plan.grid, plan.smem, args, x.device)
    y = y32 if x.dtype == torch.float32 else y32.to(x.dtype)
    return y, h


def _mix_backward(dy, x, gate_logits, lam, u, h, chunk, needs):
    N, C, H, W = x.shape
    Cg = gate_logits.shape[3]
    dtype, device = x.dtype, x.device
    dx32 = torch.zeros((N, C, H, W), dtype=torch.float32, device=device) if needs[0] else None
    dgl = _new_output(gate_logits.shape, dtype, device) if needs[1] else None
    dgacc = torch.zeros(gate_logits.shape, dtype=torch.float32, device=device) if needs[1] and Cg != C else None
    dlam = _new_output(lam.shape, dtype, device) if needs[2] else None
    du = _new_output(u.shape, dtype, device) if needs[3] else None
    if x.numel() > 0:
        kernels = _kernels(device.index, _DTYPE_TAGS[dtype])
        plan = _plan(N, C, H, W, mix=True, backward=True)
        args = (_ptr(x), _ptr(gate_logits), _ptr(lam), _ptr(u), _ptr(h), _ptr(dy), _ptr(dx32),
                _ptr(None if dgacc is not None else dgl), _ptr(dgacc), _ptr(dlam), _ptr(du),
                *_i32(N, C, Cg, H, W, _chunk(chunk), plan.lb_col, plan.ts_col, plan.lb_row, plan.ts_row))
        _launch(kernels["gspn_mix_bwd"], plan.grid, plan.smem, args, device)
        if dgacc is not None:
            blocks = min(math.ceil(dgacc.numel() / 3 / THREADS), 2**31 - 1)
            args = (_ptr(gate_logits), _ptr(dgacc), _ptr(dgl), *_i32(N, Cg, H, W))
            _launch(kernels["gspn_mix_gate_grad"], (blocks, 1), 0, args, device)
    elif dgl is not None:
        dgl.zero_()
    dx = None if dx32 is None else (dx32 if dtype == torch.float32 else dx32.to(dtype))
    return dx, dgl, dlam, du


class _GspnMix(torch.autograd.Function):
    """gspn_mix with the CUDA kernels; saves the fp32 hidden states of the 4 directions for backward."""

    @staticmethod
    def forward(ctx, x, gate_logits, lam, u, chunk):
        x, gate_logits, lam, u = (t.contiguous() for t in (x, gate_logits, lam, u))
        y, h = _mix_forward(x, gate_logits, lam, u, chunk, keep_h=True)
        ctx.save_for_backward(x, gate_logits, lam, u, h)
        ctx.chunk = chunk
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, gate_logits, lam, u, h = ctx.saved_tensors
        needs = ctx.needs_input_grad[:4]
        if not any(needs):
            return None, None, None, None, None
        grads = _mix_backward(dy.contiguous(), x, gate_logits, lam, u, h, ctx.chunk, needs)
        return (*grads, None)


def gspn_mix_cuda(x: torch.Tensor, gate_logits: torch.Tensor, lam: torch.Tensor, u: torch.Tensor,
                  chunk: int | None = None) -> torch.Tensor:
    """Fused four-direction GSPN propagation on the GPU.

    x (N, C, H, W); gate_logits (N, 4, 3, Cg, H, W); lam, u (N, 4, C, H, W) -> y (N, C, H, W).
    Same contract as ``gspn_gen.kernels.gspn_mix`` (inputs validated there).
    """
    _check({"x": x, "gate_logits": gate_logits, "lam": lam, "u": u}, x.device, x.dtype)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, gate_logits, lam, u)):
        return _GspnMix.apply(x, gate_logits, lam, u, chunk)
    x, gate_logits, lam, u = (t.contiguous() for t in (x, gate_logits, lam, u))
    return _mix_forward(x, gate_logits, lam, u, chunk, keep_h=False)[0]


# ---------------------------------------------------------------------------------------------
# gspn_scan: one direction, gates given


def _scan_forward(x, lam, g_up, g_mid, g_down, chunk, keep_h: bool):
    """h in x's dtype and, with keep_h, an fp32 copy of it for backward (h itself when x is fp32)."""
    N, C, H, W = x.shape
    Cg = g_up.shape[1]
    out = _new_output(x.shape, x.dtype, x.device)
    hsave = None
    if keep_h:
        hsave = out if x.dtype == torch.float32 else _new_output(x.shape, torch.float32, x.device)
    if x.numel() > 0:
        plan = _plan(N, C, H, W, mix=False, backward=False)
        kernel = _kernels(x.device.index, _DTYPE_TAGS[x.dtype])["gspn_scan_fwd"]
        args = (_ptr(x), _ptr(lam), _ptr(g_up), _ptr(g_mid), _ptr(g_down), _ptr(out),
                _ptr(None if hsave is out else hsave),
                *_i32(N, C, Cg, H, W, _chunk(chunk), plan.lb_col, plan.ts_col))
        _launch(kernel, plan.grid, plan.smem, args, x.device)
    return out, hsave


def _scan_backward(dy, x, lam, g_up, g_mid, g_down, h, chunk, needs):
    N, C, H, W = x.shape
    Cg = g_up.shape[1]
    dtype, device = x.dtype, x.device
    dx = _new_output(x.shape, dtype, device) if needs[0] else None
    dlam = _new_output(lam.shape, dtype, device) if needs[1] else None
    gates = any(needs[2:5])
    dgacc = torch.zeros((3, N, Cg, H, W), dtype=torch.float32, device=device) if gates and Cg != C else None
    dg = [_new_output(g_up.shape, dtype, device) if gates and dgacc is None else None for _ in range(3)]
    if x.numel() > 0:
        plan = _plan(N, C, H, W, mix=False, backward=True)
        kernel = _kernels(device.index, _DTYPE_TAGS[dtype])["gspn_scan_bwd"]
        args = (_ptr(x), _ptr(lam), _ptr(g_up), _ptr(g_mid), _ptr(g_down), _ptr(h), _ptr(dy),
                _ptr(dx), _ptr(dlam), *(_ptr(t) for t in dg), _ptr(dgacc),
                *_i32(N, C, Cg, H, W, _chunk(chunk), plan.lb_col, plan.ts_col))
        _launch(kernel, plan.grid, plan.smem, args, device)
    elif gates and dgacc is None:
        dg = [t.zero_() for t in dg]
    if dgacc is not None:
        dg = [dgacc[k].to(dtype) for k in range(3)]
    return (dx, dlam, *(g if need else None for g, need in zip(dg, needs[2:5])))


class _GspnScan(torch.autograd.Function):
    """gspn_scan with the CUDA kernels; keeps an fp32 h for backward."""

    @staticmethod
    def forward(ctx, x, lam, g_up, g_mid, g_down, chunk):
        x, lam, g_up, g_mid, g_down = (t.contiguous() for t in (x, lam, g_up, g_mid, g_down))
        out, hsave = _scan_forward(x, lam, g_up, g_mid, g_down, chunk, keep_h=True)
        ctx.save_for_backward(x, lam, g_up, g_mid, g_down, hsave)
        ctx.chunk = chunk
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dh):
        x, lam, g_up, g_mid, g_down, hsave = ctx.saved_tensors
        needs = ctx.needs_input_grad[:5]
        if not any(needs):
            return (None,) * 6
        grads = _scan_backward(dh.contiguous(), x, lam, g_up, g_mid, g_down, hsave, ctx.chunk, needs)
        return (*grads, None)


def gspn_scan_cuda(x: torch.Tensor, lam: torch.Tensor, g_up: torch.Tensor, g_mid: torch.Tensor,
                   g_down: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """One-direction (left to right) GSPN scan on the GPU.

    x, lam (N, C, H, W); g_up, g_mid, g_down (N, Cg, H, W) normalised gates -> h (N, C, H, W).
    Same contract as ``gspn_gen.kernels.gspn_scan`` (inputs validated there).
    """
    tensors = {"x": x, "lam": lam, "g_up": g_up, "g_mid": g_mid, "g_down": g_down}
    _check(tensors, x.device, x.dtype)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors.values()):
        return _GspnScan.apply(x, lam, g_up, g_mid, g_down, chunk)
    x, lam, g_up, g_mid, g_down = (t.contiguous() for t in tensors.values())
    return _scan_forward(x, lam, g_up, g_mid, g_down, chunk, keep_h=False)[0]


# ---------------------------------------------------------------------------------------------
# The backend interface ops.py calls (interim adapter over the kernels above)

unavailable_reason = cupy_unavailable_reason


def supports(N, C, Cg, H, W, dtype, device_index=None) -> bool:
    return dtype in _DTYPE_TAGS


def mix_forward(x, gate_logits, lam, u, chunk):
    return _mix_forward(x, gate_logits, lam, u, chunk, keep_h=False)[0]


def mix_backward(dy, x, gate_logits, lam, u, chunk, needs):
    h = _mix_forward(x, gate_logits, lam, u, chunk, keep_h=True)[1]
    return _mix_backward(dy, x, gate_logits, lam, u, h, chunk, needs)


def scan_forward(x, lam, g_up, g_mid, g_down, chunk):
    return _scan_forward(x, lam, g_up, g_mid, g_down, chunk, keep_h=False)[0]


def scan_backward(dh, x, lam, g_up, g_mid, g_down, chunk, needs):
    h = _scan_forward(x, lam, g_up, g_mid, g_down, chunk, keep_h=True)[1]
    return _scan_backward(dh, x, lam, g_up, g_mid, g_down, h, chunk, needs)
