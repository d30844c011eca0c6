"""Public GSPN ops (DESIGN.md §3): inputs are checked once here, then dispatched to a backend.

Backends: "reference" (pure PyTorch, `reference.py`, any device, the CPU training path) and "cuda"
(the CuPy kernels of `cupy_backend.py`: CUDA tensors in float32, float16 or bfloat16). "auto" takes
the CUDA kernels when the tensors are on a GPU and the kernels can run there, else the reference.
"""

import functools

import torch

from .reference import gspn_mix_reference, gspn_scan_reference

__all__ = ["available_backends", "gspn_mix", "gspn_scan"]

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BACKENDS = ("auto", "cuda", "reference")
_INSTALL_HINT = "pip install 'gspn-gen[cuda13]' (or 'gspn-gen[cuda12]' for a CUDA 12 driver)"


@functools.cache
def _cuda_backend():
    """(the cupy_backend module, None) when the CUDA kernels can run here, else (None, reason)."""
    try:
        from . import cupy_backend  # lazy: importing gspn_gen.kernels never needs CuPy
    except ImportError as err:
        return None, f"the CUDA backend cannot be imported ({err}); {_INSTALL_HINT}"
    reason = cupy_backend.cupy_unavailable_reason()
    return (cupy_backend, None) if reason is None else (None, reason)


def available_backends() -> list[str]:
    """["reference"], plus "cuda" when CuPy and a GPU make the CUDA kernels usable."""
    return ["reference", "cuda"] if _cuda_backend()[0] is not None else ["reference"]


def _select(backend: str, x: torch.Tensor):
    """The cupy_backend module to run on, or None for the reference."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "reference":
        return None
    on_gpu = x.device.type == "cuda"
    if backend == "auto":
        return _cuda_backend()[0] if on_gpu and x.dtype in _CUDA_DTYPES else None
    if not on_gpu:
        raise ValueError(f"backend='cuda' needs CUDA tensors, got x on {x.device}; "
                         "move the inputs to a GPU or use backend='reference'")
    if x.dtype not in _CUDA_DTYPES:
        raise ValueError(f"backend='cuda' supports float32, float16 and bfloat16, got x of dtype {x.dtype}; "
                         "use backend='reference' for float64")
    module, reason = _cuda_backend()
    if module is None:
        raise RuntimeError(f"backend='cuda' is unavailable: {reason}")
    return module


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


def _check_shape(name: str, t: torch.Tensor, expected: tuple, layout: str) -> None:
    if tuple(t.shape) != expected:
        raise ValueError(f"{name} must have shape {layout} = {expected}, got {tuple(t.shape)}")


def _check_like_x(named: dict, x: torch.Tensor) -> None:
    for name, t in named.items():
        if t.dtype != x.dtype:
            raise ValueError(f"{name} has dtype {t.dtype}, expected {x.dtype} like x "
                             "(all inputs share one dtype)")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, expected {x.device} like x "
                             "(all inputs share one device)")


def _check_gate_channels(name: str, cg: int, c: int) -> None:
    if c % cg != 0:
        raise ValueError(f"{name} has Cg = {cg} gate channels, which must divide C = {c} (the channels of x)")


def _check_chunk(chunk) -> None:
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be None (global scan) or an int >= 1, got {chunk!r}")


# ---------------------------------------------------------------------------------------------
# Public ops
# ---------------------------------------------------------------------------------------------

def gspn_scan(x: torch.Tensor, lam: torch.Tensor, g_up: torch.Tensor, g_mid: torch.Tensor,
              g_down: torch.Tensor, chunk: int | None = None, backend: str = "auto") -> torch.Tensor:
    """One left->right GSPN scan with given, already normalised gates (DESIGN.md §3, "One direction").

    h[:, :, i, w] = lam * x + g_up * h[i-1, w-1] + g_mid * h[i, w-1] + g_down * h[i+1, w-1],
    with h zero left of column 0 and outside rows 0..H-1.

    Args:
        x: (N, C, H, W) input.
        lam: (N, C, H, W) input weight.
        g_up, g_mid, g_down: (N, Cg, H, W) gates of the neighbours at rows i-1, i, i+1 of the
            previous column; Cg divides C and gate channel j serves x channels j*k .. j*k+k-1, k = C/Cg.
        chunk: None for a global scan, or K >= 1 to restart the recursion at every w % K == 0.
        backend: "auto", "cuda" or "reference".

    Returns:
        h: (N, C, H, W) hidden states, in x's dtype (accumulated in fp32, or fp64 for fp64 inputs).
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
    _check_chunk(chunk)
    module = _select(backend, x)
    if module is None:
        return gspn_scan_reference(x, lam, g_up, g_mid, g_down, chunk)
    return module.gspn_scan_cuda(x, lam, g_up, g_mid, g_down, chunk)


def gspn_mix(x: torch.Tensor, gate_logits: torch.Tensor, lam: torch.Tensor, u: torch.Tensor,
             chunk: int | None = None, backend: str = "auto") -> torch.Tensor:
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
        backend: "auto", "cuda" or "reference".

    Returns:
        y: (N, C, H, W), in x's dtype (accumulated in fp32, or fp64 for fp64 inputs).
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
    _check_chunk(chunk)
    module = _select(backend, x)
    if module is None:
        return gspn_mix_reference(x, gate_logits, lam, u, chunk)
    return module.gspn_mix_cuda(x, gate_logits, lam, u, chunk)
