"""CUDA backend of the GSPN propagation: the kernels in ``cuda/*.cu``, compiled at run time by CuPy.

``mix_forward`` / ``mix_backward`` / ``scan_forward`` / ``scan_backward`` take contiguous tensors that
``ops.py`` has validated (shapes, one dtype and device, Cg dividing C) and return plain tensors; the
autograd of the public ops lives in ``ops.py`` and saves only the op's inputs, since the backward
kernels recompute everything else on chip. Nothing here re-validates.

Data flow (details in ``cuda/gspn_common.cuh``). gspn_mix runs clusters of 4 CTAs (sm_90) over a group
of ``lb`` planes (n, c); CTA d scans direction d, reading each input map once with 16-byte vectors
(x once per direction: 1.136x the floor's bytes forward, 1.140x backward, ``mix_traffic``), lines
held in registers by the lanes of a warp, or of up to 4 warps for long lines on few planes; the four
fp32 partial planes are summed on chip through distributed shared memory in a fixed order and written
once -- no atomics, so every result is bitwise reproducible. Backward keeps the gate inputs,
dy and one fp32 plane resident in shared memory and makes two passes (adjoint, then recomputation of
h with the per-pixel gradients). One launch per call, plus an epilogue when compact gates (Cg < C) do
not fit a CTA's planes. gspn_scan uses the same code with one CTA per group and direction 0.

Limits: lines of at most ``MAX_LINE`` = 1024 positions (max(H, W)), and a plan that fits the device's
shared memory per block (227 KiB on H100/H200): backward holds 3 gate maps and dy in the input dtype plus
one fp32 plane, i.e. 12 bytes per pixel of a plane in bf16/fp16 (up to ~18K pixels: 128 x 128, squares
up to 136 x 136) and 20 in fp32 (~11K: squares up to 104 x 104); forward needs 4 bytes per pixel.
``supports`` says whether a shape fits; ``ops.py`` sends the others to the PyTorch backend. The kernels
need thread-block clusters (sm_90, H100/H200); ``unavailable_reason`` says so on older GPUs.

Compilation: NVRTC through ``cupy.RawModule`` (``-std=c++17 -arch=sm_90``), every kernel of every dtype
at the first use (so the first call of another dtype may sit inside a CUDA-graph capture), once per
device, kept in CuPy's disk cache; kernels launch on
PyTorch's current stream with their arguments in one struct (``_Args`` mirrors ``struct Args``).
CuPy is imported lazily: importing this module needs neither CuPy nor a GPU.
"""

from __future__ import annotations

import ctypes
import functools
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["INSTALL_HINT", "MAX_LINE", "Launch", "mix_backward", "mix_forward", "mix_traffic", "scan_backward",
           "scan_forward", "supports", "unavailable_reason"]

INSTALL_HINT = "pip install 'gspn-gen[cuda13]' (or 'gspn-gen[cuda12]' for a CUDA 12 driver)"
R_VALUES = (1, 2, 4, 8)           # positions per scan lane (template parameter R)
LINE_WARPS = (1, 2, 4)            # warps holding one line
MAX_LINE = 32 * LINE_WARPS[-1] * R_VALUES[-1]  # longest line: 4 warps x 32 lanes x 8 positions
_DTYPE_TAGS = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_CUDA_DIR = Path(__file__).with_name("cuda")
_SOURCES = ("gspn_device.cuh", "gspn_line.cuh", "gspn_common.cuh", "gspn_forward.cu", "gspn_backward.cu")
_KERNELS = ("gspn_mix_fwd", "gspn_mix_bwd", "gspn_scan_fwd", "gspn_scan_bwd")
_DEFAULT_SMEM = 48 * 1024         # dynamic shared memory a kernel gets without opting in
_EPILOGUE_THREADS = 256


@dataclass(frozen=True)
class Launch:
    """Launch settings; the defaults serve every shape, tests and the benchmark's --tune vary them.

    loaders: threads per CTA beside the scan warps (a multiple of 32); they stage tiles and write results.
    scan_lanes: target scan lanes per CTA: planes per CTA = scan_lanes / lanes per line (fewer if
        shared memory is short), and a long line on few planes gets up to `line_warps` warps.
    line_warps: most warps holding one line (1, 2 or 4).
    tile: most scan steps per staged tile (a power of two).
    smem: shared-memory budget per CTA in bytes; None = the device's opt-in maximum.
    """

    loaders: int = 128
    scan_lanes: int = 128
    line_warps: int = 4
    tile: int = 16
    smem: int | None = None


# ---------------------------------------------------------------------------------------------
# Launch plan: planes per CTA, tile, vector width and the shared-memory layout of each line kind


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def _roundup(v: int, m: int) -> int:
    return -(-v // m) * m


def _line(P: int, R: int, w_max: int) -> tuple[int, int] | None:
    """(warps W, lanes per warp G) holding a line of P positions at R per lane, or None if it needs more
    than w_max warps. One warp when it fits (G lanes, a power of two); else W whole warps (G = 32)."""
    if P <= 32 * R:
        return 1, min(32, _next_pow2(-(-P // R)))
    W = _next_pow2(-(-P // (32 * R)))
    return (W, 32) if W <= w_max else None


@dataclass(frozen=True)
class _Geo:
    """One line kind's plan; the fields of ``struct Geo`` (gspn_common.cuh), in order."""

    P: int
    L: int
    G: int
    nt: int
    Ps: int
    Pp: int
    nscan: int
    stage: int
    stage_arr: int
    stage_buf: int
    plane: int
    res: int
    res_arr: int
    ostage: int
    ostage_t: int
    ostage_f: int
    ostage_buf: int
    W: int
    xchg: int
    end: int  # bytes of shared memory this kind uses (not passed to the kernel)


@dataclass(frozen=True)
class _Plan:
    R: int
    lb: int
    ts: int
    V: int
    gmode: int
    threads: int
    smem: int
    groups: int
    geo: tuple[_Geo, _Geo]   # column lines, row lines


def _geo(P: int, L: int, R: int, line: tuple[int, int], lb: int, ts: int, e: int, backward: bool, mix: bool,
         gmode: int) -> _Geo:
    """Shared-memory layout of one line kind (the order gspn_common.cuh describes), 16-byte aligned."""
    a16 = functools.partial(_roundup, m=16)
    W, G = line
    Ps = _roundup(P, max(R, 16 // e))
    Pp = (P | 1) if R == 1 else _roundup(P, R)  # a lane writes R floats (aligned vectors from R = 4)
    if R > 1 and Pp % 32 == 0:
        Pp += 4  # column-direction reads of the final sum hit 8 banks instead of 1
    nscan = 32 * -(-lb * G * W // 32)
    at = a16(4 * lb * 8)  # offset tables
    stage_arr = a16(ts * lb * Ps * e)
    stage_buf = (2 if backward else (6 if mix else 5)) * stage_arr
    stage, at = at, at + 2 * stage_buf
    plane, at = at, at + a16(lb * L * Pp * 4)
    res_arr = a16(lb * L * Ps * e) if backward else 0
    res, at = at, at + 4 * res_arr
    ostage_t = a16(ts * lb * Ps * e) if backward else 0
    ostage_f = a16(ts * lb * Ps * 4) if backward else 0
    ostage_buf = 2 * ostage_t + 3 * (ostage_t if gmode == 0 else ostage_f)
    ostage, at = at, at + 2 * ostage_buf
    xchg, at = at, at + (a16(2 * lb * W * 2 * 4) if W > 1 else 0)
    return _Geo(P, L, G, -(-L // ts), Ps, Pp, nscan, stage, stage_arr, stage_buf, plane, res, res_arr, ostage,
                ostage_t, ostage_f, ostage_buf, W, xchg, at)


@functools.lru_cache(maxsize=512)
def _plan(N: int, C: int, Cg: int, H: int, W: int, e: int, backward: bool, mix: bool, vec_ok: bool,
          launch: Launch, smem_limit: int) -> _Plan | None:
    """The launch plan, or None when no plan fits the shared memory or the line is too long.

    Preference: 16-byte vectors (tiles of at least 16 / e steps) when W and the pointers (vec_ok) allow,
    then as many planes per CTA (lb) as the target asks, then the longest tile that fits. A CTA's scan
    lanes are about launch.scan_lanes: lb lines of up to 32 lanes each, or, when few planes fit, a long
    line spread over up to launch.line_warps warps; R (positions per lane) is the least that then holds
    both line kinds. With compact gates the backward takes lb a multiple of C / Cg where one fits (the
    gate gradient is then summed inside the CTA, gmode 1), else gmode 2 (per-channel scratch + epilogue).
    """
    if max(H, W) > 32 * R_VALUES[-1] * launch.line_warps:
        return None
    kk, NC = C // Cg, N * C
    target = min(NC, max(1, launch.scan_lanes // min(32, _next_pow2(max(H, W)))))
    lbs = [lb for lb in range(target, 0, -1) if not backward or kk == 1 or lb % kk == 0 or lb < kk]
    vm = 16 // e
    vectors = vec_ok and W % vm == 0
    ts_top = max(1, min(launch.tile, _next_pow2(max(H, W))))
    tiles = [1 << k for k in range(ts_top.bit_length() - 1, -1, -1)]
    for ts_min in ((vm, 1) if vectors else (1,)):
        for lb in lbs:
            # warps a line may take: the lanes left per plane, a power of two; 15 named barriers at most
            spare = launch.scan_lanes // (32 * lb)
            w_max = 1 if lb > 15 or spare < 2 else min(launch.line_warps, 1 << (spare.bit_length() - 1))
            R = next((r for r in R_VALUES if all(_line(P, r, w_max) for P in (H, W))), None)
            if R is None:
                continue
            gmode = 0 if kk == 1 else (1 if lb % kk == 0 else 2)
            for ts in (t for t in tiles if t >= ts_min):
                V = vm if vectors and ts % vm == 0 else 1
                kinds = tuple(_geo(P, L, R, _line(P, R, w_max), lb, ts, e, backward, mix, gmode)
                              for P, L in ((H, W), (W, H)))
                smem = max(k.end for k in kinds)
                threads = max(k.nscan for k in kinds) + launch.loaders
                if smem <= smem_limit and threads <= 1024:
                    return _Plan(R, lb, ts, V, gmode if backward else 0, threads, smem, -(-NC // lb), kinds)
    return None


# ---------------------------------------------------------------------------------------------
# The argument struct (a ctypes mirror of struct Args in gspn_common.cuh)


class _GeoC(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int) for name in _Geo.__dataclass_fields__ if name != "end"]


class _Args(ctypes.Structure):
    _fields_ = [("x", ctypes.c_void_p), ("lam", ctypes.c_void_p), ("u", ctypes.c_void_p),
                ("gate", ctypes.c_void_p * 3), ("dy", ctypes.c_void_p), ("y", ctypes.c_void_p),
                ("dx", ctypes.c_void_p), ("dlam", ctypes.c_void_p), ("du", ctypes.c_void_p),
                ("dgate", ctypes.c_void_p * 3), ("scratch", ctypes.c_void_p),
                *((name, ctypes.c_longlong) for name in
                  ("HW", "map_n", "map_d", "gate_n", "gate_d", "scr_n", "scr_d", "scr_k")),
                *((name, ctypes.c_int) for name in
                  ("N", "C", "Cg", "H", "W", "K", "kk", "NC", "lb", "ts", "V", "gmode", "nthreads", "dirs")),
                ("geo", _GeoC * 2)]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _args(plan: _Plan, shape: tuple[int, int, int, int, int], chunk: int | None, mix: bool, *, x, lam, u=None,
          gate=(None, None, None), dy=None, y=None, dx=None, dlam=None, du=None, dgate=(None, None, None),
          scratch=None) -> _Args:
    """The kernel arguments: pointers (gate k of the mix = logits + k * Cg * H * W), strides, plan."""
    N, C, Cg, H, W = shape
    HW = H * W
    a = _Args()
    a.x, a.lam, a.u, a.dy, a.y = _ptr(x), _ptr(lam), _ptr(u), _ptr(dy), _ptr(y)
    a.dx, a.dlam, a.du, a.scratch = _ptr(dx), _ptr(dlam), _ptr(du), _ptr(scratch)
    for k in range(3):
        a.gate[k], a.dgate[k] = gate[k], dgate[k]
    a.HW = HW
    a.map_n, a.map_d = (4 * C * HW, C * HW) if mix else (C * HW, 0)
    a.gate_n, a.gate_d = (12 * Cg * HW, 3 * Cg * HW) if mix else (Cg * HW, 0)
    a.scr_n, a.scr_d, a.scr_k = (12 * C * HW, 3 * C * HW, C * HW) if mix else (C * HW, 0, N * C * HW)
    a.N, a.C, a.Cg, a.H, a.W = N, C, Cg, H, W
    a.K = chunk or 0
    a.kk, a.NC = C // Cg, N * C
    a.lb, a.ts, a.V, a.gmode, a.nthreads = plan.lb, plan.ts, plan.V, plan.gmode, plan.threads
    a.dirs = 4 if mix else 1
    for kind, geo in enumerate(plan.geo):
        for name, _ in _GeoC._fields_:
            setattr(a.geo[kind], name, getattr(geo, name))
    return a


def _gate_ptrs(t: torch.Tensor | None, mix: bool, Cg: int, HW: int) -> tuple:
    """Pointers of gate k: the mix's (N, 4, 3, Cg, H, W) logits at k * Cg * HW; the scan's three tensors."""
    if t is None:
        return (None, None, None)
    if mix:
        return tuple(t.data_ptr() + k * Cg * HW * t.element_size() for k in range(3))
    return tuple(_ptr(g) for g in t)


# ---------------------------------------------------------------------------------------------
# CuPy: compilation, device limits, launch


def _import_cupy():
    import cupy  # optional dependency, imported on first use

    return cupy


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@functools.cache
def unavailable_reason() -> str | None:
    """None when the CUDA kernels can run here, else a one-line reason (with the fix when there is one)."""
    try:
        cupy = _import_cupy()
    except ImportError:
        return f"CuPy is not installed: {INSTALL_HINT}"
    except Exception as err:  # noqa: BLE001  (a broken CuPy install raises other errors at import)
        return f"CuPy failed to import ({type(err).__name__}: {_first_line(err)}); reinstall it: {INSTALL_HINT}"
    if not torch.cuda.is_available():
        return "no CUDA device is visible to PyTorch (torch.cuda.is_available() is False)"
    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    if major < 9:
        return (f"the GSPN CUDA kernels need thread-block clusters (sm_90: H100/H200), "
                f"{torch.cuda.get_device_name(index)} is sm_{major}{minor}")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "CuPy sees no CUDA device"
    except Exception as err:  # noqa: BLE001  (driver errors come in several types)
        return f"CuPy cannot use the CUDA driver ({_first_line(err)}); install the CuPy build for it: {INSTALL_HINT}"
    try:
        _kernels(index)
    except Exception as err:  # noqa: BLE001  (NVRTC and loader errors come in several types)
        return f"the GSPN CUDA kernels failed to compile: {_first_line(err)}"
    return None


def source() -> str:
    """The kernel sources as one translation unit (headers inlined, so CuPy's cache sees every line)."""
    parts = []
    for name in _SOURCES:
        lines = (_CUDA_DIR / name).read_text().splitlines()
        kept = [ln for ln in lines if not ln.strip().startswith('#include "') and ln.strip() != "#pragma once"]
        parts.append(f'#line 1 "{name}"\n' + "\n".join(kept))
    return "\n".join(parts) + "\n"


def kernel_name(kernel: str, dtype: torch.dtype, R: int | None = None) -> str:
    """The name expression of one instantiation, e.g. 'gspn_mix_fwd<BF16, 4>', 'gspn_gate_grad<F32>'."""
    tag = _DTYPE_TAGS[dtype]
    return f"{kernel}<{tag}>" if R is None else f"{kernel}<{tag}, {R}>"


def kernel_names(dtype: torch.dtype) -> list[str]:
    """Every kernel instantiation of one dtype."""
    return [kernel_name(k, dtype, R) for k in _KERNELS for R in R_VALUES] + [kernel_name("gspn_gate_grad", dtype)]


COMPILE_OPTIONS = ("-std=c++17", "-arch=sm_90")


@functools.cache
def _kernels(device_index: int) -> dict:
    """Compile (NVRTC, cached on disk by CuPy) and load every kernel of every dtype for one device.

    One module per dtype, compiled in parallel threads (NVRTC releases the GIL; one by one if that
    fails), all before the first launch.
    """
    cupy = _import_cupy()

    def build(dtype):
        names = kernel_names(dtype)
        code = source() + f"// instantiations: {', '.join(names)}\n"  # a distinct cache key per module
        with cupy.cuda.Device(device_index):
            module = cupy.RawModule(code=code, options=COMPILE_OPTIONS, name_expressions=names)
            module.compile()
            return {name: module.get_function(name) for name in names}

    found = {}
    try:
        with ThreadPoolExecutor(len(_DTYPE_TAGS)) as pool:
            for part in pool.map(build, _DTYPE_TAGS):
                found.update(part)
    except Exception:  # noqa: BLE001  (whatever went wrong in parallel: once more one by one, errors raised)
        for dtype in _DTYPE_TAGS:
            found.update(build(dtype))
    return found


@functools.cache
def _smem_limit(device_index: int) -> int:
    """Opt-in dynamic shared memory per block of the device, in bytes."""
    cupy = _import_cupy()
    runtime = cupy.cuda.runtime
    return runtime.deviceGetAttribute(runtime.cudaDevAttrMaxSharedMemoryPerBlockOptin, device_index)


class _StreamRef:
    """A CUDA stream handle speaking the CUDA stream protocol (for ``cupy.cuda.Stream.from_external``)."""

    def __init__(self, handle: int):
        self.handle = handle

    def __cuda_stream__(self):
        return (0, self.handle)


@functools.lru_cache(maxsize=64)
def _wrap_stream(handle: int, device_index: int):
    """CuPy's view of a PyTorch stream: ``ExternalStream`` while it exists, else ``Stream.from_external``."""
    cupy = _import_cupy()
    if hasattr(cupy.cuda, "ExternalStream"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return cupy.cuda.ExternalStream(handle, device_index)
    return cupy.cuda.Stream.from_external(_StreamRef(handle))


_OPTED: dict[tuple[int, int], int] = {}


def _launch(kernel, grid: int, block: int, smem: int, args: _Args, device: torch.device) -> None:
    """Launch on PyTorch's current stream with the argument struct passed by value."""
    cupy = _import_cupy()
    from cupy.cuda.function import CPointer

    with cupy.cuda.Device(device.index):
        most = kernel.max_threads_per_block  # registers permitting
        if block > most:
            raise ValueError(f"the launch settings ask for {block} threads per CTA; this kernel takes at most {most} "
                             "(fewer loaders or scan lanes in Launch)")
        if smem > _DEFAULT_SMEM and _OPTED.get((id(kernel), device.index), 0) < smem:
            kernel.max_dynamic_shared_size_bytes = smem
            _OPTED[(id(kernel), device.index)] = smem
        with _wrap_stream(torch.cuda.current_stream(device).cuda_stream, device.index):
            kernel((grid,), (block,), (CPointer(ctypes.addressof(args)),), shared_mem=smem)


# ---------------------------------------------------------------------------------------------
# The ops


def _vec_ok(*tensors) -> bool:
    return all(t is None or t.data_ptr() % 16 == 0 for t in tensors)


def _limit(device: torch.device, launch: Launch) -> int:
    return launch.smem if launch.smem is not None else _smem_limit(device.index)


def _plan_or_raise(shape, dtype, backward: bool, mix: bool, vec_ok: bool, launch: Launch, device) -> _Plan:
    N, C, Cg, H, W = shape
    limit = _limit(device, launch)
    plan = _plan(N, C, Cg, H, W, torch.empty((), dtype=dtype).element_size(), backward, mix, vec_ok, launch, limit)
    if plan is None:
        raise ValueError(
            f"maps of H x W = {H} x {W} exceed the CUDA kernels' limits (lines of at most "
            f"{32 * R_VALUES[-1] * launch.line_warps} positions; "
            f"{'backward' if backward else 'forward'} plan within {limit} bytes of shared memory per block); "
            "use the PyTorch backend for them")
    return plan


def supports(N: int, C: int, Cg: int, H: int, W: int, dtype: torch.dtype, device_index: int | None = None) -> bool:
    """Whether the kernels run these shapes (forward and backward) on the device with default settings."""
    if dtype not in _DTYPE_TAGS or unavailable_reason() is not None:
        return False
    index = torch.cuda.current_device() if device_index is None else device_index
    return fits(N, C, Cg, H, W, dtype, _smem_limit(index))


def fits(N: int, C: int, Cg: int, H: int, W: int, dtype: torch.dtype, smem_limit: int) -> bool:
    """Whether forward and backward launch plans exist for these shapes within `smem_limit` bytes per block."""
    e = torch.empty((), dtype=dtype).element_size()
    return all(_plan(N, C, Cg, H, W, e, bwd, True, True, Launch(), smem_limit) is not None for bwd in (False, True))


def _run(kernel: str, x: torch.Tensor, plan: _Plan, args: _Args, mix: bool) -> None:
    name = kernel_name(kernel, x.dtype, plan.R)
    fn = _kernels(x.device.index)[name]
    _launch(fn, (4 if mix else 1) * plan.groups, plan.threads, plan.smem, args, x.device)


def _gate_epilogue(x: torch.Tensor, args: _Args, total: int) -> None:
    fn = _kernels(x.device.index)[kernel_name("gspn_gate_grad", x.dtype)]
    blocks = min(-(-total // _EPILOGUE_THREADS), 65535 * 32)
    _launch(fn, blocks, _EPILOGUE_THREADS, 0, args, x.device)


def mix_forward(x, gate_logits, lam, u, chunk: int | None, launch: Launch | None = None) -> torch.Tensor:
    """y (N, C, H, W) of gspn_mix; x (N, C, H, W), gate_logits (N, 4, 3, Cg, H, W), lam and u (N, 4, C, H, W)."""
    launch = launch or Launch()
    N, C, H, W = x.shape
    shape = (N, C, gate_logits.shape[3], H, W)
    y = torch.empty_like(x)
    plan = _plan_or_raise(shape, x.dtype, False, True, _vec_ok(x, gate_logits, lam, u, y), launch, x.device)
    args = _args(plan, shape, chunk, True, x=x, lam=lam, u=u, gate=_gate_ptrs(gate_logits, True, shape[2], H * W), y=y)
    _run("gspn_mix_fwd", x, plan, args, mix=True)
    return y


def mix_backward(dy, x, gate_logits, lam, u, chunk: int | None, needs: tuple[bool, bool, bool, bool],
                 launch: Launch | None = None):
    """(dx, dgate_logits, dlam, du) of gspn_mix, None where needs[i] is False."""
    launch = launch or Launch()
    N, C, H, W = x.shape
    Cg = gate_logits.shape[3]
    shape = (N, C, Cg, H, W)
    dx, dgl, dlam, du = (torch.empty_like(t) if need else None for t, need in zip((x, gate_logits, lam, u), needs))
    plan = _plan_or_raise(shape, x.dtype, True, True, _vec_ok(dy, x, gate_logits, lam, u, dx, dgl, dlam, du),
                          launch, x.device)
    scratch = None
    if dgl is not None and plan.gmode == 2:
        scratch = torch.empty((N, 4, 3, C, H, W), dtype=torch.float32, device=x.device)
    args = _args(plan, shape, chunk, True, x=x, lam=lam, u=u, gate=_gate_ptrs(gate_logits, True, Cg, H * W), dy=dy,
                 dx=dx, dlam=dlam, du=du, dgate=_gate_ptrs(dgl, True, Cg, H * W), scratch=scratch)
    _run("gspn_mix_bwd", x, plan, args, mix=True)
    if scratch is not None:
        _gate_epilogue(x, args, N * 4 * Cg * H * W)
    return dx, dgl, dlam, du


def scan_forward(x, lam, g_up, g_mid, g_down, chunk: int | None, launch: Launch | None = None) -> torch.Tensor:
    """h (N, C, H, W) of gspn_scan; x, lam (N, C, H, W), gates (N, Cg, H, W)."""
    launch = launch or Launch()
    N, C, H, W = x.shape
    shape = (N, C, g_up.shape[1], H, W)
    h = torch.empty_like(x)
    plan = _plan_or_raise(shape, x.dtype, False, False, _vec_ok(x, lam, g_up, g_mid, g_down, h), launch, x.device)
    args = _args(plan, shape, chunk, False, x=x, lam=lam, gate=_gate_ptrs((g_up, g_mid, g_down), False, 0, 0), y=h)
    _run("gspn_scan_fwd", x, plan, args, mix=False)
    return h


def scan_backward(dh, x, lam, g_up, g_mid, g_down, chunk: int | None, needs: tuple[bool, bool, bool, bool, bool],
                  launch: Launch | None = None):
    """(dx, dlam, dg_up, dg_mid, dg_down) of gspn_scan, None where needs[i] is False."""
    launch = launch or Launch()
    N, C, H, W = x.shape
    Cg = g_up.shape[1]
    shape = (N, C, Cg, H, W)
    dx = torch.empty_like(x) if needs[0] else None
    dlam = torch.empty_like(lam) if needs[1] else None
    gates = any(needs[2:])
    dg = tuple(torch.empty_like(g_up) for _ in range(3)) if gates else (None, None, None)
    plan = _plan_or_raise(shape, x.dtype, True, False, _vec_ok(dh, x, lam, g_up, g_mid, g_down, dx, dlam, *dg),
                          launch, x.device)
    scratch = None
    if gates and plan.gmode == 2:
        scratch = torch.empty((3, N, C, H, W), dtype=torch.float32, device=x.device)
    args = _args(plan, shape, chunk, False, x=x, lam=lam, gate=_gate_ptrs((g_up, g_mid, g_down), False, 0, 0), dy=dh,
                 dx=dx, dlam=dlam, dgate=_gate_ptrs(dg, False, 0, 0), scratch=scratch)
    _run("gspn_scan_bwd", x, plan, args, mix=False)
    if scratch is not None:
        _gate_epilogue(x, args, N * Cg * H * W)
    return (dx, dlam, *(g if need else None for g, need in zip(dg, needs[2:])))


# ---------------------------------------------------------------------------------------------
# Bytes by design


def mix_traffic(N: int, C: int, Cg: int, H: int, W: int, dtype: torch.dtype, launch: Launch | None = None,
                smem_limit: int = 232448) -> dict:
    """Global-memory bytes gspn_mix moves by construction (forward; backward with all four gradients),
    from the launch plans, next to the floor (each input read once, each output written once).

    Counts every load and store the kernels issue; the CPU emulation checks that it counts the same.
    smem_limit defaults to H100/H200's 227 KiB.
    """
    launch = launch or Launch()
    e = torch.empty((), dtype=dtype).element_size()
    HW, NC, kk = H * W, N * C, C // Cg
    px = N * HW
    floor_fwd = (C + 12 * Cg + 8 * C + C) * px * e
    floor_bwd = (2 * C + 12 * Cg + 8 * C) * px * e + (C + 12 * Cg + 8 * C) * px * e
    out = {"floor_fwd": floor_fwd, "floor_bwd": floor_bwd}
    for backward in (False, True):
        plan = _plan(N, C, Cg, H, W, e, backward, True, True, launch, smem_limit)
        key = "bwd" if backward else "fwd"
        if plan is None:
            out[key] = None
            continue
        planes = gate_planes = 0
        for group in range(plan.groups):  # gate planes of a group: those its planes use
            pl0 = group * plan.lb
            n = min(plan.lb, NC - pl0)
            planes += n
            gate_planes += (pl0 + n - 1) // kk - pl0 // kk + 1
        if not backward:  # per direction: x, lam, u, 3 gate maps read; y written once
            moved = 4 * (3 * planes + 3 * gate_planes) * HW * e + NC * HW * e
        else:  # per direction: 3 gate maps, dy, u, x, lam read; dlam, du and the gate gradients written
            moved = 4 * (4 * planes + 3 * gate_planes) * HW * e + 4 * 2 * planes * HW * e + NC * HW * e
            if plan.gmode == 2:  # fp32 per-channel gate gradients, then the epilogue
                moved += 4 * 3 * planes * HW * 4 + (4 * 3 * NC * HW * 4 + 4 * 3 * N * Cg * HW * 2 * e)
            else:
                moved += 4 * 3 * gate_planes * HW * e
        out[key] = moved
        out[f"plan_{key}"] = {"planes_per_cta": plan.lb, "tile": plan.ts, "vector": plan.V, "threads": plan.threads,
                              "smem": plan.smem, "R": plan.R, "line_warps": max(g.W for g in plan.geo),
                              "gmode": plan.gmode}
    return out
