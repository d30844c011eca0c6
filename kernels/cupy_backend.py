"""CUDA backend of the GSPN propagation: the kernels in ``cuda/*.cu``, compiled at run time by CuPy.

``mix_forward`` / ``mix_backward`` / ``scan_forward`` / ``scan_backward`` take contiguous tensors that
``ops.py`` has validated (shapes, one dtype and device, Cg dividing C) and return plain tensors; the
autograd of the public ops lives in ``ops.py`` and saves only the op's inputs, since the backward
kernels recompute everything else on chip. Nothing here re-validates.

Two variants of gspn_mix run the same launch plan (``cuda_plan.py``): "cluster" (sm_90: clusters of 4 CTAs,
the direction sum through distributed shared memory) and "portable" (sm_80+: no clusters, the last CTA
of each group sums the others' fp32 partial planes from a global scratch). They give bitwise identical
results. gspn_scan needs no cluster and is the same kernel in both.

Choosing a variant, once per process and device, before the first launch: every variant the device
supports (cluster, then portable) gets a trial in a fresh Python process (``python -m`` this module: compile
everything, launch one gspn_mix and one gspn_scan forward and backward on small odd-shaped bf16 maps,
synchronise, compare with the PyTorch backend, ``compare``), so that a fault poisons that process and
not the caller's; the first to pass is compiled and tried once more here, then used. Each failure is one warning naming the reason and what
is used instead; when none passes, ``ops.py`` runs the PyTorch backend. ``GSPN_BACKEND=cuda-cluster`` or
``cuda-portable`` forces a variant; ``GSPN_CUDA_TRIAL=inprocess`` skips the separate process (for a GPU
that admits one process only).

Limits: lines of at most ``MAX_LINE`` = 1024 positions (max(H, W)), and a plan that fits the device's
shared memory per block (227 KiB on H100/H200, 163 KiB on A100, 99 KiB on Ada / sm_86): backward holds 3 gate
maps and dy in the input dtype plus one fp32 plane. ``supports`` says whether a shape fits;
``ops.py`` sends the others to the PyTorch backend.

Compilation: NVRTC through ``cupy.RawModule`` (``-std=c++17 -arch=sm_XY`` for the device), one module per
(dtype, R, variant) compiled in parallel threads at the first use of a variant (so the first call of
another dtype may sit inside a CUDA-graph capture), kept in CuPy's disk cache. Kernels launch on
PyTorch's current stream with their arguments in one struct (``_Args`` mirrors ``struct Args``).
CuPy is imported lazily: importing this module needs neither CuPy nor a GPU.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import re
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import torch

from .cuda_plan import (  # noqa: F401
    ARCHS,
    LINE_WARPS,
    MAX_LINE,
    R_VALUES,
    VARIANTS,
    Device,
    Launch,
    Plan,
    geo_fields,
    mix_traffic,
    plan,
)
from .testing import mix_inputs, scan_inputs
from .torch_backend import mix_backward as torch_mix_backward
from .torch_backend import mix_forward as torch_mix_forward
from .torch_backend import scan_backward as torch_scan_backward
from .torch_backend import scan_forward as torch_scan_forward

__all__ = ["INSTALL_HINT", "MAX_LINE", "TRIAL_TOLERANCE", "VARIANTS", "Launch", "bound", "compare", "mix_backward",
           "mix_forward", "mix_traffic", "scan_backward", "scan_forward", "supports", "trial_main", "unavailable_reason",
           "variant"]

INSTALL_HINT = "pip install 'gspn-gen[cuda13]' (or 'gspn-gen[cuda12]' for a CUDA 12 driver)"
_DTYPE_TAGS = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_CUDA_DIR = Path(__file__).with_name("cuda")
_SOURCES = ("gspn_device.cuh", "gspn_line.cuh", "gspn_common.cuh", "gspn_forward.cu", "gspn_backward.cu")
_MIX_KERNELS = {"cluster": ("gspn_mix_fwd", "gspn_mix_bwd"),
                "portable": ("gspn_mix_fwd_portable", "gspn_mix_bwd_portable")}
_SCAN_KERNELS = ("gspn_scan_fwd", "gspn_scan_bwd")
_MIN_SM = {"cluster": 90, "portable": 80}
_DEFAULT_SMEM = 48 * 1024         # dynamic shared memory a kernel gets without opting in
_EPILOGUE_THREADS = 256
TRIAL_TIMEOUT_S = 900
ENV_BACKEND = "GSPN_BACKEND"
ENV_TRIAL = "GSPN_CUDA_TRIAL"
_FORCED = {"cuda-cluster": "cluster", "cuda-portable": "portable"}


# ---------------------------------------------------------------------------------------------
# Kernel names, source, compile options


def kernel_name(kernel: str, dtype: torch.dtype, R: int | None = None) -> str:
    """The name expression of one instantiation, e.g. 'gspn_mix_fwd<BF16, 4>', 'gspn_gate_grad<F32>'."""
    tag = _DTYPE_TAGS[dtype]
    return f"{kernel}<{tag}>" if R is None else f"{kernel}<{tag}, {R}>"


def module_names(dtype: torch.dtype, R: int, variant: str) -> list[str]:
    """The kernels of one module: a variant's mix kernels for one dtype and R; the portable module also
    holds the scan kernels and (R = 1) the compact-gate epilogue, which every variant uses."""
    names = [kernel_name(k, dtype, R) for k in _MIX_KERNELS[variant]]
    if variant == "portable":
        names += [kernel_name(k, dtype, R) for k in _SCAN_KERNELS]
        if R == R_VALUES[0]:
            names.append(kernel_name("gspn_gate_grad", dtype))
    return names


def kernel_names(dtype: torch.dtype, variant: str = "cluster") -> list[str]:
    """Every kernel a variant launches for one dtype (the cluster variant uses the portable module's scan)."""
    mods = ["portable"] if variant == "portable" else ["cluster", "portable"]
    names = [n for R in R_VALUES for m in mods for n in module_names(dtype, R, m)]
    return names if variant == "portable" else [n for n in names if "portable" not in n]


def source() -> str:
    """The kernel sources as one translation unit (headers inlined, so CuPy's cache sees every line)."""
    parts = []
    for name in _SOURCES:
        lines = (_CUDA_DIR / name).read_text().splitlines()
        kept = [ln for ln in lines if not ln.strip().startswith('#include "') and ln.strip() != "#pragma once"]
        parts.append(f'#line 1 "{name}"\n' + "\n".join(kept))
    return "\n".join(parts) + "\n"


def compile_options(sm: int) -> tuple[str, ...]:
    """NVRTC options for compute capability sm (e.g. 90): IEEE division and no fast math (NVRTC's defaults)."""
    return ("-std=c++17", f"-arch=sm_{sm}")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _import_cupy():
    import cupy  # optional dependency, imported on first use

    return cupy


def ptxas_report(sm: int, names: list[str]) -> dict[str, dict]:
    """Registers, stack frame and spills of each kernel in `names` built by NVRTC for sm_XY, from ptxas's
    verbose log: {name: {"registers", "stack", "spill_stores", "spill_loads"}}. Needs NVRTC (CuPy), no GPU."""
    from cupy_backends.cuda.libs import nvrtc

    prog = nvrtc.createProgram(source(), "gspn.cu", [], [])
    for name in names:
        nvrtc.addNameExpression(prog, name)
    try:
        nvrtc.compileProgram(prog, [*compile_options(sm), "--ptxas-options=--verbose"])
    except nvrtc.NVRTCError as err:
        raise RuntimeError(f"NVRTC failed for sm_{sm}: {nvrtc.getProgramLog(prog)[-4000:]}") from err
    log = nvrtc.getProgramLog(prog).replace("\0", "")
    lowered = {nvrtc.getLoweredName(prog, name): name for name in names}
    out = {}
    for block in re.split(r"(?=ptxas info\s*: Compiling entry function)", log):
        m = re.search(r"Compiling entry function '(\S+)'", block)
        if not m or m.group(1) not in lowered:
            continue
        frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", block)
        regs = re.search(r"Used (\d+) registers", block)
        out[lowered[m.group(1)]] = {"registers": int(regs.group(1)), "stack": int(frame.group(1)),
                                    "spill_stores": int(frame.group(2)), "spill_loads": int(frame.group(3))}
    out["_log"] = log
    return out


# ---------------------------------------------------------------------------------------------
# The argument struct (a ctypes mirror of struct Args in gspn_common.cuh)


class _GeoC(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int) for name in geo_fields()]


class _Args(ctypes.Structure):
    _fields_ = [("x", ctypes.c_void_p), ("lam", ctypes.c_void_p), ("u", ctypes.c_void_p),
                ("gate", ctypes.c_void_p * 3), ("dy", ctypes.c_void_p), ("y", ctypes.c_void_p),
                ("dx", ctypes.c_void_p), ("dlam", ctypes.c_void_p), ("du", ctypes.c_void_p),
                ("dgate", ctypes.c_void_p * 3), ("scratch", ctypes.c_void_p), ("part", ctypes.c_void_p),
                ("meta", ctypes.c_void_p),
                *((name, ctypes.c_longlong) for name in
                  ("HW", "map_n", "map_d", "gate_n", "gate_d", "scr_n", "scr_d", "scr_k")),
                *((name, ctypes.c_int) for name in
                  ("N", "C", "Cg", "H", "W", "K", "kk", "NC", "lb", "ts", "S", "V", "gmode", "nthreads", "dirs")),
                ("geo", _GeoC * 2)]


_POINTER_FIELDS = 17  # the leading 8-byte pointer words of Args


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _args(p: Plan, shape: tuple[int, int, int, int, int], chunk: int | None, mix: bool, *, x, lam, u=None,
          gate=(None, None, None), dy=None, y=None, dx=None, dlam=None, du=None, dgate=(None, None, None),
          scratch=None, part=None, meta=None) -> _Args:
    """The kernel arguments: pointers (gate k of the mix = logits + k * Cg * H * W), strides, plan."""
    N, C, Cg, H, W = shape
    HW = H * W
    a = _Args()
    a.x, a.lam, a.u, a.dy, a.y = _ptr(x), _ptr(lam), _ptr(u), _ptr(dy), _ptr(y)
    a.dx, a.dlam, a.du, a.scratch = _ptr(dx), _ptr(dlam), _ptr(du), _ptr(scratch)
    a.part, a.meta = _ptr(part), _ptr(meta)
    for k in range(3):
        a.gate[k], a.dgate[k] = gate[k], dgate[k]
    a.HW = HW
    a.map_n, a.map_d = (4 * C * HW, C * HW) if mix else (C * HW, 0)
    a.gate_n, a.gate_d = (12 * Cg * HW, 3 * Cg * HW) if mix else (Cg * HW, 0)
    a.scr_n, a.scr_d, a.scr_k = (12 * C * HW, 3 * C * HW, C * HW) if mix else (C * HW, 0, N * C * HW)
    a.N, a.C, a.Cg, a.H, a.W = N, C, Cg, H, W
    a.K = chunk or 0
    a.kk, a.NC = C // Cg, N * C
    a.lb, a.ts, a.S, a.V, a.gmode, a.nthreads = p.lb, p.ts, p.S, p.V, p.gmode, p.threads
    a.dirs = 4 if mix else 1
    for kind, geo in enumerate(p.geo):
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
# Devices, compilation, variants


@functools.cache
def _capability(device_index: int) -> int:
    major, minor = torch.cuda.get_device_capability(device_index)
    return 10 * major + minor


@functools.cache
def _device_limits(device_index: int) -> Device:
    """The device's limits for the planner (per block / per SM shared memory, threads, CTAs, SMs)."""
    runtime = _import_cupy().cuda.runtime

    def attr(name: str) -> int:
        return runtime.deviceGetAttribute(getattr(runtime, name), device_index)

    return Device(torch.cuda.get_device_name(device_index), _capability(device_index),
                  attr("cudaDevAttrMaxSharedMemoryPerBlockOptin"), attr("cudaDevAttrMaxSharedMemoryPerMultiprocessor"),
                  attr("cudaDevAttrMaxThreadsPerMultiProcessor"), attr("cudaDevAttrMaxBlocksPerMultiprocessor"),
                  attr("cudaDevAttrMultiProcessorCount"))


def _device(device: torch.device) -> Device:
    """Limits for tensors on `device`; CPU tensors (the tests' emulation of the kernels) get an H100's."""
    return _device_limits(device.index) if device.type == "cuda" else ARCHS["sm_90"]


@functools.cache
def _kernels(device_index: int, variant: str) -> dict:
    """Compile (NVRTC, cached on disk by CuPy) and load every kernel a variant uses, for one device.

    One module per (dtype, R) and variant, compiled in parallel threads (NVRTC releases the GIL; one by
    one if that fails), all before the first launch.
    """
    cupy = _import_cupy()
    sm = _capability(device_index)
    mods = [(dtype, R, m) for dtype in _DTYPE_TAGS for R in R_VALUES
            for m in (["portable"] if variant == "portable" else ["cluster", "portable"])]

    def build(job):
        dtype, R, m = job
        names = module_names(dtype, R, m)
        code = source() + f"// instantiations: {', '.join(names)}\n"  # a distinct cache key per module
        with cupy.cuda.Device(device_index):
            module = cupy.RawModule(code=code, options=compile_options(sm), name_expressions=names)
            module.compile()
            return {name: module.get_function(name) for name in names}

    found = {}
    try:
        with ThreadPoolExecutor(min(len(mods), max(1, os.cpu_count() or 1))) as pool:
            for part in pool.map(build, mods):
                found.update(part)
    except Exception:  # noqa: BLE001  (whatever went wrong in parallel: once more one by one, errors raised)
        for job in mods:
            found.update(build(job))
    return found


@functools.cache
def _precondition() -> str | None:
    """Why no CUDA kernel can run in this process at all (CuPy, a CUDA device), or None."""
    try:
        cupy = _import_cupy()
    except ImportError:
        return f"CuPy is not installed: {INSTALL_HINT}"
    except Exception as err:  # noqa: BLE001  (a broken CuPy install raises other errors at import)
        return f"CuPy failed to import ({type(err).__name__}: {_first_line(err)}); reinstall it: {INSTALL_HINT}"
    if not torch.cuda.is_available():
        return "no CUDA device is visible to PyTorch (torch.cuda.is_available() is False)"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "CuPy sees no CUDA device"
    except Exception as err:  # noqa: BLE001  (driver errors come in several types)
        return f"CuPy cannot use the CUDA driver ({_first_line(err)}); install the CuPy build for it: {INSTALL_HINT}"
    return None


def _trial_subprocess(variant: str, device_index: int) -> str | None:
    """The trial in a fresh Python process (trial_main): None when it passed, else the reason."""
    try:
        done = subprocess.run([sys.executable, "-m", __name__, variant, str(device_index)], capture_output=True,
                              text=True, timeout=TRIAL_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return f"the trial process did not finish within {TRIAL_TIMEOUT_S} s"
    except OSError as err:
        return f"the trial process could not start ({err}); set {ENV_TRIAL}=inprocess to try in this process"
    for line in reversed(done.stdout.strip().splitlines()):
        try:
            verdict = json.loads(line)
        except ValueError:
            continue
        return None if verdict.get("ok") else verdict.get("reason", "the trial failed")
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return f"the trial process exited with status {done.returncode} ({tail})"


@functools.cache
def _trial(variant: str, device_index: int) -> str | None:
    """None when `variant` passed its trial on the device (a fresh process, then this one), else why not."""
    sm = _capability(device_index)
    if sm < _MIN_SM[variant]:
        return (f"the {variant} variant needs sm_{_MIN_SM[variant]}+, "
                f"{torch.cuda.get_device_name(device_index)} is sm_{sm}")
    if os.environ.get(ENV_TRIAL, "subprocess") != "inprocess":
        reason = _trial_subprocess(variant, device_index)
        if reason is not None:
            return reason
    if torch.cuda.is_current_stream_capturing():
        try:  # no synchronisation inside a capture: compile and load only (the trial process vouched)
            _kernels(device_index, variant)
        except Exception as err:  # noqa: BLE001
            return f"the kernels failed to compile: {_first_line(err)}"
        return None
    return _trial_inprocess(variant, device_index)


def _forced_variant() -> str | None:
    return _FORCED.get(os.environ.get(ENV_BACKEND, ""))


@functools.cache
def _selection(device_index: int) -> tuple[str | None, str | None]:
    """(variant, None) for the first variant that passes its trial (GSPN_BACKEND may force one), else
    (None, reason). Each failure is one warning naming its reason and what is tried next."""
    forced = _forced_variant()
    order = [forced] if forced else [v for v in VARIANTS if _capability(device_index) >= _MIN_SM[v]]
    if not order:
        return None, (f"the GSPN CUDA kernels need sm_80+, {torch.cuda.get_device_name(device_index)} is "
                      f"sm_{_capability(device_index)}")
    reasons = []
    for i, v in enumerate(order):
        reason = _trial(v, device_index)
        if reason is None:
            return v, None
        following = f"the {order[i + 1]} variant" if i + 1 < len(order) else "the PyTorch backend"
        if forced:
            following = f"nothing else ({ENV_BACKEND}={os.environ[ENV_BACKEND]})"
        warnings.warn(f"GSPN CUDA kernels: the {v} variant failed its trial on "
                      f"{torch.cuda.get_device_name(device_index)} ({reason}); trying {following}", RuntimeWarning,
                      stacklevel=2)
        reasons.append(f"{v} variant: {reason}")
    return None, "; ".join(reasons)


def unavailable_reason(variant: str | None = None) -> str | None:
    """None when the CUDA kernels (the chosen variant, or `variant`) can run on the current device, else
    a one-line reason (with the fix when there is one)."""
    reason = _precondition()
    if reason is not None:
        return reason
    index = torch.cuda.current_device()
    if variant is not None:
        return _trial(variant, index)
    return _selection(index)[1]


def variant(device_index: int | None = None) -> str | None:
    """The variant gspn_mix runs on the device ("cluster" or "portable"), None when neither can."""
    if _precondition() is not None:
        return None
    return _selection(torch.cuda.current_device() if device_index is None else device_index)[0]


# ---------------------------------------------------------------------------------------------
# The trial: compile, launch, synchronise, compare


TRIAL_SHAPE = (2, 6, 3, 11, 24)   # N, C, Cg, H, W: odd H, compact gates, 16-byte vectors along W
TRIAL_CHUNK = 5
# Relative L2 error of the kernels' results against the PyTorch backend in fp32 on the same inputs: the
# rounding of the result dtype (bf16 keeps 8 bits, fp16 11) plus what the scan accumulates over a line.
TRIAL_TOLERANCE = {torch.bfloat16: 0.02, torch.float16: 0.004, torch.float32: 2e-5}
MIX_NAMES = ("y", "dx", "dgate_logits", "dlam", "du")
SCAN_NAMES = ("h", "scan dx", "scan dlam", "dg_up", "dg_mid", "dg_down")


def _relative_error(got: torch.Tensor | None, want: torch.Tensor) -> float:
    if got is None or not torch.isfinite(got).all():
        return float("inf")
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def compare(variant: str, device_index: int, shape, dtype: torch.dtype, chunk: int | None,
            seed: int = 11) -> tuple[dict, list]:
    """gspn_mix and gspn_scan, forward and backward, by the kernels of `variant` against the PyTorch backend
    in fp32 on the same GPU: ({output name: relative L2 error}, the kernels' outputs); the error is inf for a
    non-finite or missing output (fresh outputs are NaN under torch's deterministic fill, so an unwritten
    element fails)."""
    device = torch.device("cuda", device_index)
    with torch.cuda.device(device):
        (x, logits, lam, u), dy = mix_inputs(*shape, dtype, device, seed=seed)
        ours = [mix_forward(x, logits, lam, u, chunk, variant=variant),
                *mix_backward(dy, x, logits, lam, u, chunk, (True,) * 4, variant=variant)]
        (xs, lams, *gates), dh = scan_inputs(*shape, dtype, device, seed=seed + 1)
        ours += [scan_forward(xs, lams, *gates, chunk, variant=variant),
                 *scan_backward(dh, xs, lams, *gates, chunk, (True,) * 5, variant=variant)]
        torch.cuda.synchronize(device)
        f32 = [t.float() for t in (x, logits, lam, u, dy, xs, lams, *gates, dh)]
        want = [torch_mix_forward(*f32[:4], chunk), *torch_mix_backward(f32[4], *f32[:4], chunk, (True,) * 4),
                torch_scan_forward(*f32[5:10], chunk), *torch_scan_backward(f32[10], *f32[5:10], chunk, (True,) * 5)]
    return {name: _relative_error(got, exp) for name, got, exp in zip(MIX_NAMES + SCAN_NAMES, ours, want)}, ours


def _trial_inprocess(variant: str, device_index: int) -> str | None:
    """None when `variant` compiles, launches and matches the PyTorch backend on the device; else why not."""
    try:
        _kernels(device_index, variant)
    except Exception as err:  # noqa: BLE001  (NVRTC and loader errors come in several types)
        return f"the kernels failed to compile: {_first_line(err)}"
    try:
        errors, _ = compare(variant, device_index, TRIAL_SHAPE, torch.bfloat16, TRIAL_CHUNK)
    except Exception as err:  # noqa: BLE001  (launch and driver errors come in several types)
        return f"a trial launch failed: {_first_line(err)}"
    for name, err in errors.items():
        if not err <= TRIAL_TOLERANCE[torch.bfloat16]:
            return f"{name} is off the PyTorch backend by {err:.3g} (relative, bf16 {TRIAL_SHAPE}, chunk {TRIAL_CHUNK})"
    return None


def trial_main(argv: list[str] | None = None) -> None:
    """The trial process, `python -m gspn_gen.kernels.cupy_backend VARIANT DEVICE`: one JSON line,
    {"ok": true} or {"ok": false, "reason": "..."}."""
    variant, device_index = (argv if argv is not None else sys.argv[1:])[:2]
    reason = _trial_inprocess(variant, int(device_index))
    print(json.dumps({"ok": reason is None, "reason": reason}), flush=True)


# ---------------------------------------------------------------------------------------------
# Launch


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


def _launch(kernel, name: str, grid: int, block: int, smem: int, args: _Args, device: torch.device, what: str) -> None:
    """Launch on PyTorch's current stream with the argument struct passed by value; a failure names the
    kernel, the plan, the grid and the shared memory."""
    cupy = _import_cupy()
    from cupy.cuda.function import CPointer

    context = f"{name} (grid {grid} x {block} threads, {smem} B of shared memory; {what})"
    with cupy.cuda.Device(device.index):
        most = kernel.max_threads_per_block  # registers permitting
        if block > most:
            raise ValueError(f"{context}: the plan asks for {block} threads per CTA, the kernel takes at most {most} "
                             "(fewer loaders or scan lanes in Launch)")
        try:
            if smem > _DEFAULT_SMEM and _OPTED.get((id(kernel), device.index), 0) < smem:
                kernel.max_dynamic_shared_size_bytes = smem
                _OPTED[(id(kernel), device.index)] = smem
            with _wrap_stream(torch.cuda.current_stream(device).cuda_stream, device.index):
                kernel((grid,), (block,), (CPointer(ctypes.addressof(args)),), shared_mem=smem)
        except Exception as err:
            raise RuntimeError(f"{context} failed to launch: {_first_line(err)}") from err


# ---------------------------------------------------------------------------------------------
# The ops


def _vec_ok(*tensors) -> bool:
    return all(t is None or t.data_ptr() % 16 == 0 for t in tensors)


def _resolve_variant(device: torch.device, requested: str | None) -> str:
    """The variant to launch: the requested one, else the device's choice (the portable code when the
    tensors are not on a GPU: the tests' emulation)."""
    if requested is not None:
        return requested
    if device.type != "cuda":
        return "portable"
    chosen = variant(device.index)
    if chosen is None:
        raise RuntimeError(f"the GSPN CUDA kernels are unavailable: {unavailable_reason()}")
    return chosen


def _regs(device: torch.device, variant_: str, dtype: torch.dtype, backward: bool, mix: bool) -> tuple | None:
    """Registers per thread of the kernel for each R (the loaded kernels'), None off a GPU."""
    if device.type != "cuda":
        return None
    kernels = _kernels(device.index, variant_)
    kind = _MIX_KERNELS[variant_][int(backward)] if mix else _SCAN_KERNELS[int(backward)]
    return tuple(kernels[kernel_name(kind, dtype, R)].num_regs for R in R_VALUES)


def _plan_or_raise(shape, dtype, backward: bool, mix: bool, vec_ok: bool, launch: Launch, device: torch.device,
                   variant_: str) -> Plan:
    N, C, Cg, H, W = shape
    limits = _device(device)
    p = plan(N, C, Cg, H, W, dtype.itemsize, backward, mix, vec_ok, launch, limits,
             _regs(device, variant_, dtype, backward, mix))
    if p is None:
        budget = launch.smem if launch.smem is not None else limits.smem_block
        raise ValueError(
            f"maps of H x W = {H} x {W} exceed the CUDA kernels' limits (lines of at most "
            f"{32 * R_VALUES[-1] * launch.line_warps} positions; "
            f"{'backward' if backward else 'forward'} plan within {budget} bytes of shared memory per block); "
            "use the PyTorch backend for them")
    return p


def supports(N: int, C: int, Cg: int, H: int, W: int, dtype: torch.dtype, device_index: int | None = None,
             variant_: str | None = None, backward: bool = True) -> bool:
    """Whether the kernels run these shapes on the device with default settings: forward and backward
    plans, or (backward=False) a forward plan."""
    if dtype not in _DTYPE_TAGS or unavailable_reason(variant_) is not None:
        return False
    index = torch.cuda.current_device() if device_index is None else device_index
    e = dtype.itemsize
    return all(plan(N, C, Cg, H, W, e, bwd, True, True, Launch(), _device_limits(index)) is not None
               for bwd in ((False, True) if backward else (False,)))


def _describe(p: Plan) -> str:
    ahead = "/".join(str(g.D) for g in p.geo)
    return (f"plan R={p.R}, {p.lb} planes per CTA, tile {p.ts} x {p.S} stages, resident lookahead {ahead}, "
            f"vectors of {p.V}, {max(g.W for g in p.geo)} warps per line, gmode {p.gmode}")


def _run(kernel: str, x: torch.Tensor, p: Plan, args: _Args, mix: bool, variant_: str) -> None:
    name = kernel_name(kernel, x.dtype, p.R)
    fn = _kernels(x.device.index, variant_)[name]
    _launch(fn, name, (4 if mix else 1) * p.groups, p.threads, p.smem, args, x.device, _describe(p))


def _gate_epilogue(x: torch.Tensor, args: _Args, total: int, variant_: str) -> None:
    name = kernel_name("gspn_gate_grad", x.dtype)
    fn = _kernels(x.device.index, variant_)[name]
    blocks = min(-(-total // _EPILOGUE_THREADS), 65535 * 32)
    _launch(fn, name, blocks, _EPILOGUE_THREADS, 0, args, x.device, "compact-gate epilogue")


def _combine_buffers(x: torch.Tensor, p: Plan, variant_: str):
    """The portable variant's direction-sum scratch: 3 fp32 partial planes per plane, 8 zeroed ints per group."""
    if variant_ != "portable":
        return None, None
    N, C, H, W = x.shape
    part = torch.empty((3, N * C, H * W), dtype=torch.float32, device=x.device)
    meta = torch.zeros((p.groups, 8), dtype=torch.int32, device=x.device)
    return part, meta


def mix_forward(x, gate_logits, lam, u, chunk: int | None, launch: Launch | None = None,
                variant: str | None = None) -> torch.Tensor:
    """y (N, C, H, W) of gspn_mix; x (N, C, H, W), gate_logits (N, 4, 3, Cg, H, W), lam and u (N, 4, C, H, W)."""
    launch = launch or Launch()
    v = _resolve_variant(x.device, variant)
    N, C, H, W = x.shape
    shape = (N, C, gate_logits.shape[3], H, W)
    y = torch.empty_like(x)
    p = _plan_or_raise(shape, x.dtype, False, True, _vec_ok(x, gate_logits, lam, u, y), launch, x.device, v)
    part, meta = _combine_buffers(x, p, v)
    args = _args(p, shape, chunk, True, x=x, lam=lam, u=u, gate=_gate_ptrs(gate_logits, True, shape[2], H * W), y=y,
                 part=part, meta=meta)
    _run(_MIX_KERNELS[v][0], x, p, args, True, v)
    return y


def mix_backward(dy, x, gate_logits, lam, u, chunk: int | None, needs: tuple[bool, bool, bool, bool],
                 launch: Launch | None = None, variant: str | None = None):
    """(dx, dgate_logits, dlam, du) of gspn_mix, None where needs[i] is False."""
    launch = launch or Launch()
    v = _resolve_variant(x.device, variant)
    N, C, H, W = x.shape
    Cg = gate_logits.shape[3]
    shape = (N, C, Cg, H, W)
    dx, dgl, dlam, du = (torch.empty_like(t) if need else None for t, need in zip((x, gate_logits, lam, u), needs))
    p = _plan_or_raise(shape, x.dtype, True, True, _vec_ok(dy, x, gate_logits, lam, u, dx, dgl, dlam, du),
                       launch, x.device, v)
    scratch = None
    if dgl is not None and p.gmode == 2:
        scratch = torch.empty((N, 4, 3, C, H, W), dtype=torch.float32, device=x.device)
    part, meta = _combine_buffers(x, p, v) if dx is not None else (None, None)
    args = _args(p, shape, chunk, True, x=x, lam=lam, u=u, gate=_gate_ptrs(gate_logits, True, Cg, H * W), dy=dy,
                 dx=dx, dlam=dlam, du=du, dgate=_gate_ptrs(dgl, True, Cg, H * W), scratch=scratch, part=part,
                 meta=meta)
    _run(_MIX_KERNELS[v][1], x, p, args, True, v)
    if scratch is not None:
        _gate_epilogue(x, args, N * 4 * Cg * H * W, v)
    return dx, dgl, dlam, du


def scan_forward(x, lam, g_up, g_mid, g_down, chunk: int | None, launch: Launch | None = None,
                 variant: str | None = None) -> torch.Tensor:
    """h (N, C, H, W) of gspn_scan; x, lam (N, C, H, W), gates (N, Cg, H, W)."""
    launch = launch or Launch()
    v = _resolve_variant(x.device, variant)
    N, C, H, W = x.shape
    shape = (N, C, g_up.shape[1], H, W)
    h = torch.empty_like(x)
    p = _plan_or_raise(shape, x.dtype, False, False, _vec_ok(x, lam, g_up, g_mid, g_down, h), launch, x.device, v)
    args = _args(p, shape, chunk, False, x=x, lam=lam, gate=_gate_ptrs((g_up, g_mid, g_down), False, 0, 0), y=h)
    _run(_SCAN_KERNELS[0], x, p, args, False, v)
    return h


def scan_backward(dh, x, lam, g_up, g_mid, g_down, chunk: int | None, needs: tuple[bool, bool, bool, bool, bool],
                  launch: Launch | None = None, variant: str | None = None):
    """(dx, dlam, dg_up, dg_mid, dg_down) of gspn_scan, None where needs[i] is False."""
    launch = launch or Launch()
    v = _resolve_variant(x.device, variant)
    N, C, H, W = x.shape
    Cg = g_up.shape[1]
    shape = (N, C, Cg, H, W)
    dx = torch.empty_like(x) if needs[0] else None
    dlam = torch.empty_like(lam) if needs[1] else None
    gates = any(needs[2:])
    dg = tuple(torch.empty_like(g_up) for _ in range(3)) if gates else (None, None, None)
    p = _plan_or_raise(shape, x.dtype, True, False, _vec_ok(dh, x, lam, g_up, g_mid, g_down, dx, dlam, *dg),
                       launch, x.device, v)
    scratch = None
    if gates and p.gmode == 2:
        scratch = torch.empty((3, N, C, H, W), dtype=torch.float32, device=x.device)
    args = _args(p, shape, chunk, False, x=x, lam=lam, gate=_gate_ptrs((g_up, g_mid, g_down), False, 0, 0), dy=dh,
                 dx=dx, dlam=dlam, dgate=_gate_ptrs(dg, False, 0, 0), scratch=scratch)
    _run(_SCAN_KERNELS[1], x, p, args, False, v)
    if scratch is not None:
        _gate_epilogue(x, args, N * Cg * H * W, v)
    return (dx, dlam, *(g if need else None for g, need in zip(dg, needs[2:])))


@functools.cache
def bound(variant_: str) -> SimpleNamespace:
    """The four ops with the variant fixed (the backend object behind backend="cuda-cluster" / "cuda-portable")."""
    return SimpleNamespace(**{name: functools.partial(globals()[name], variant=variant_)
                              for name in ("mix_forward", "mix_backward", "scan_forward", "scan_backward")},
                           variant=variant_)


if __name__ == "__main__":
    trial_main()
