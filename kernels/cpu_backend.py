"""Compiled CPU backend of the GSPN propagation: `cpu/gspn_cpu.cpp` (DESIGN.md §3), called through ctypes.

Built on first use with `torch.utils.cpp_extension.load` (ninja, the system C++ compiler, OpenMP) into
torch's extension cache (`$TORCH_EXTENSIONS_DIR`, default `~/.cache/torch_extensions`), under a name that
hashes the sources, the flags and this CPU's model and instruction set, so a cache on a shared home
directory is never used on a CPU it was not built for. The library includes no torch header (it takes
plain pointers), so the build takes seconds. Where no compiler works, `unavailable_reason()` says why
and `ops.py` runs the PyTorch backend instead.

Why C++ through cpp_extension and not numba: the kernel includes `cuda/gspn_line.cuh`, the per-line
arithmetic the CUDA kernels and their emulation use, so the three cannot drift (numba would need that
arithmetic written again in Python); cpp_extension is what PyTorch extensions use, with a build cache
that rebuilds when the sources change and a file lock that lets DDP ranks share one build; and it adds
no dependency beyond a C++ compiler (numba brings llvmlite and its own JIT cache).

Arithmetic is fp32, or fp64 for fp64 inputs; bf16 and fp16 inputs are computed in fp32 and rounded once.
Threads: torch's intra-op thread count (`torch.set_num_threads`) over work items (groups of gate planes,
interleaved on small maps); no reduction crosses items, so the result does not depend on the thread count.

Functions (inputs valid and contiguous; `ops.py` checks them): mix_forward, mix_backward, scan_forward,
scan_backward.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
from pathlib import Path

import torch

__all__ = ["mix_backward", "mix_forward", "scan_backward", "scan_forward", "unavailable_reason"]

_SOURCE = Path(__file__).with_name("cpu") / "gspn_cpu.cpp"
_HEADER = Path(__file__).with_name("cuda") / "gspn_line.cuh"
_FLAGS = ["-O3", "-march=native", "-fopenmp"]


def _cpu_identity() -> str:
    """The CPU's model and instruction-set flags (what -march=native compiles for)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def build_name() -> str:
    """The extension's name: sources, flags, compiler and CPU hashed together."""
    h = hashlib.sha256()
    for part in (_SOURCE.read_bytes(), _HEADER.read_bytes(), " ".join(_FLAGS).encode(),
                 os.environ.get("CXX", "c++").encode(), platform.machine().encode(), _cpu_identity().encode()):
        h.update(part)
        h.update(b"\0")
    return f"gspn_cpu_{h.hexdigest()[:16]}"


_ENTRIES = {
    "mix_forward": 5,    # pointers, then N, C, Cg, H, W, K, nthreads
    "mix_backward": 9,
    "scan_forward": 6,
    "scan_backward": 11,
}


@functools.cache
def _library():
    """(the loaded library, None), or (None, why it could not be built)."""
    try:
        cpp_extension = _cpp_extension()
        path = cpp_extension.load(name=build_name(), sources=[str(_SOURCE)], extra_cflags=_FLAGS,
                                  extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
        lib = ctypes.CDLL(path)
    except Exception as err:  # noqa: BLE001  (no compiler, no ninja, a failed build or load: all mean "not here")
        return None, _first_line(err)
    for suffix in ("f32", "f64"):
        for entry, pointers in _ENTRIES.items():
            fn = getattr(lib, f"gspn_cpu_{entry}_{suffix}")
            fn.argtypes = [ctypes.c_void_p] * pointers + [ctypes.c_int] * 7
            fn.restype = ctypes.c_int
    lib.gspn_cpu_sigmoid_f32.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_longlong]
    lib.gspn_cpu_sigmoid_f32.restype = None
    return lib, None


def _cpp_extension():
    """torch.utils.cpp_extension, imported without its notice about CUDA_HOME (nothing here is CUDA), with
    the `ninja` of the Python package on PATH when the system has none (a venv used without activating it)."""
    if shutil.which("ninja") is None:
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)
    return cpp_extension


def _first_line(err: Exception) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors[1] if len(errors) > 1 else lines[0])[:300] if lines else type(err).__name__


def unavailable_reason() -> str | None:
    """None when the compiled kernel is built and loaded (building it on first call), else why not."""
    return _library()[1]


def sigmoid(z: torch.Tensor) -> torch.Tensor:
    """The shared header's fp32 sigmoid (gspn_line.cuh) over a tensor, for testing its accuracy."""
    lib = _library()[0]
    z = z.to(torch.float32).contiguous()
    out = torch.empty_like(z)
    lib.gspn_cpu_sigmoid_f32(z.data_ptr(), out.data_ptr(), z.numel())
    return out


# ---------------------------------------------------------------------------------------------
# The ops

def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _call(entry: str, cd: torch.dtype, tensors, shape, chunk) -> None:
    lib = _library()[0]
    fn = getattr(lib, f"gspn_cpu_{entry}_{'f64' if cd == torch.float64 else 'f32'}")
    ptrs = [None if t is None else t.data_ptr() for t in tensors]
    status = fn(*ptrs, *shape, chunk or 0, torch.get_num_threads())
    if status:
        raise MemoryError(f"gspn CPU kernel ({entry}): scratch memory could not be allocated for maps of shape {shape}")


def _shape(x: torch.Tensor, cg: int) -> tuple:
    n, c, h, w = x.shape
    return n, c, cg, h, w


def _inputs(cd, *tensors):
    return [t.to(cd).contiguous() for t in tensors]


def _outputs(cd, needs, likes):
    return [torch.empty(t.shape, dtype=cd) if need else None for need, t in zip(needs, likes)]


def _back(t, like):
    return None if t is None else t.to(like.dtype)


def mix_forward(x, gate_logits, lam, u, chunk):
    """y (N, C, H, W) in x's dtype."""
    cd = _compute_dtype(x.dtype)
    ins = _inputs(cd, x, gate_logits, lam, u)
    y = torch.empty(x.shape, dtype=cd)
    _call("mix_forward", cd, [*ins, y], _shape(x, gate_logits.shape[3]), chunk)
    return y.to(x.dtype)


def mix_backward(dy, x, gate_logits, lam, u, chunk, needs):
    """(dx, d gate_logits, dlam, du), each None unless `needs` asks for it; hidden states recomputed."""
    cd = _compute_dtype(x.dtype)
    ins = _inputs(cd, dy, x, gate_logits, lam, u)
    likes = (x, gate_logits, lam, u)
    outs = _outputs(cd, needs, likes)
    if any(needs):
        _call("mix_backward", cd, [*ins, *outs], _shape(x, gate_logits.shape[3]), chunk)
    return tuple(_back(t, like) for t, like in zip(outs, likes))


def scan_forward(x, lam, g_up, g_mid, g_down, chunk):
    """h (N, C, H, W) in x's dtype."""
    cd = _compute_dtype(x.dtype)
    ins = _inputs(cd, x, lam, g_up, g_mid, g_down)
    h = torch.empty(x.shape, dtype=cd)
    _call("scan_forward", cd, [*ins, h], _shape(x, g_mid.shape[1]), chunk)
    return h.to(x.dtype)


def scan_backward(dh, x, lam, g_up, g_mid, g_down, chunk, needs):
    """(dx, dlam, dg_up, dg_mid, dg_down), each None unless `needs` asks for it."""
    cd = _compute_dtype(x.dtype)
    ins = _inputs(cd, dh, x, lam, g_up, g_mid, g_down)
    likes = (x, lam, g_up, g_mid, g_down)
    outs = _outputs(cd, needs, likes)
    if any(needs):
        _call("scan_backward", cd, [*ins, *outs], _shape(x, g_mid.shape[1]), chunk)
    return tuple(_back(t, like) for t, like in zip(outs, likes))
