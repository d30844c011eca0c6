"""Helpers of the kernel tests around the CPU emulation of the CUDA kernels (fixtures: conftest.py).

`cuda_emulation.cpp` compiles the real kernels/cuda sources with g++ (see its header). BUILDS lists
the builds a session uses: the shared library driven through ctypes, the AddressSanitizer and
ThreadSanitizer drivers, and deliberately broken copies of the sources. The emulated backend is
cupy_backend itself (plan, argument struct, allocation, both variants) with its two CuPy hooks,
`_kernels` and `_launch`, pointed at the emulation.
"""

from __future__ import annotations

import ctypes
import functools
import shutil
import struct
import subprocess
from pathlib import Path

import torch
from gspn_gen.kernels import cupy_backend
from gspn_gen.kernels.cuda_plan import Launch

CUDA_DIR = Path(cupy_backend.__file__).resolve().parent / "cuda"
EMULATION = Path(__file__).with_name("cuda_emulation.cpp")
NO_GXX = shutil.which("g++") is None

# name -> (extra g++ flags, shared library (True) or driver executable, mutation (file, old, new) or None)
BUILDS = {
    "lib": (["-O1"], True, None),
    # AddressSanitizer, and UBSan's alignment check for the shared-memory vector accesses (16-byte Vec16,
    # 4-byte words of 16-bit pairs), which are plain C++ dereferences the emulation cannot intercept.
    "asan": (["-O1", "-g", "-fsanitize=address,alignment", "-fno-sanitize-recover=alignment", "-fno-omit-frame-pointer",
              "-DEMU_NO_F16", "-DEMU_NO_R8"], False, None),
    "tsan": (["-O1", "-g", "-fsanitize=thread", "-DEMU_NO_F16", "-DEMU_NO_R8"], False, None),
    # One index off by one: each scan lane stores its partial plane one position too far.
    "mutant_index": (["-O1", "-DEMU_NO_BF16", "-DEMU_NO_F16", "-DEMU_NO_R8"], True,
                     ("gspn_forward.cu", "write_row_f32<R>(plane + (s0 + ss) * g.Pp + ln.p0, out)",
                      "write_row_f32<R>(plane + (s0 + ss) * g.Pp + ln.p0 + 1, out)")),
    # The barrier that opens each tile removed: scan lanes read a staging buffer while the loaders'
    # copies land in it.
    "mutant_barrier": (["-O1", "-g", "-fsanitize=thread", "-DEMU_NO_BF16", "-DEMU_NO_F16", "-DEMU_NO_R8"], False,
                       ("gspn_forward.cu", "    __syncthreads();  // tile it is staged and visible; the buffer of tile it - 1 is free\n", "")),
    # The loaders' wait for the oldest tile removed: its asynchronous copies are read before they land.
    "mutant_wait": (["-O1", "-DEMU_NO_BF16", "-DEMU_NO_F16", "-DEMU_NO_R8"], True,
                    ("gspn_forward.cu", "    if (loader) wait_oldest_tile(a.S);\n", "")),
    # The named barrier of a line held by several warps removed: the exchange slots race.
    "mutant_line": (["-O1", "-g", "-fsanitize=thread", "-DEMU_NO_BF16", "-DEMU_NO_F16", "-DEMU_NO_R8"], False,
                    ("gspn_common.cuh", "    line_sync(1 + ln.j, 32 * W);\n", "")),
    # The cluster barrier before the sum removed: a CTA reads planes the others are still writing.
    "mutant_cluster": (["-O1", "-g", "-fsanitize=thread", "-DEMU_NO_BF16", "-DEMU_NO_F16", "-DEMU_NO_R8"], False,
                       ("gspn_common.cuh", "  cluster_sync();\n  const int total = cells(a, c.nplanes);\n",
                        "  const int total = cells(a, c.nplanes);\n")),
    # The portable sum's wait for the other three CTAs removed: the last CTA reads partial planes (and
    # their directions) that may not be written yet.
    "mutant_ticket": (["-O1", "-g", "-fsanitize=thread", "-DEMU_NO_BF16", "-DEMU_NO_F16", "-DEMU_NO_R8"], False,
                      ("gspn_common.cuh", "    while (acquire_load(meta + 1) < 3) backoff();\n", "")),
}


def build(name: str, root: Path) -> Path:
    """Compile one variant of BUILDS into root; returns the library or executable."""
    flags, shared, mutation = BUILDS[name]
    src_dir = CUDA_DIR
    if mutation is not None:
        src_dir = root / f"{name}_src"
        shutil.copytree(CUDA_DIR, src_dir)
        file, old, new = mutation
        text = (src_dir / file).read_text()
        assert text.count(old) == 1, f"{name}: the mutated line is not in {file} exactly once"
        (src_dir / file).write_text(text.replace(old, new))
    out = root / (f"lib{name}.so" if shared else name)
    cmd = ["nice", "-n", "10", "g++", "-std=c++20", "-pthread", *flags, f"-I{src_dir}", str(EMULATION), "-o", str(out)]
    if shared:
        cmd[5:5] = ["-shared", "-fPIC"]
    else:
        cmd.insert(5, "-DEMU_MAIN")
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"building the {name} emulation failed:\n{done.stderr[-4000:]}")
    return out


class Emulation:
    """The ctypes face of a built emulation library."""

    def __init__(self, path: Path):
        self.lib = ctypes.CDLL(str(path))
        self.lib.emu_launch.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
        self.lib.emu_error_text.restype = ctypes.c_char_p

    def launch(self, kernel, name: str, grid: int, block: int, smem: int, args, device, what: str = "") -> None:
        """cupy_backend._launch's signature; `kernel` is the name as well (the _kernels hook below)."""
        assert device.type == "cpu"
        self.lib.emu_launch(name.encode(), grid, block, smem, ctypes.addressof(args))
        if self.lib.emu_error_count():
            text = self.lib.emu_error_text().decode()
            self.lib.emu_reset()
            raise RuntimeError(f"emulation error in {name} ({what}): {text}")

    def set_order(self, order: str) -> None:
        """How the 4 CTAs of a portable group run: "concurrent", "in order" or "reversed"."""
        self.lib.emu_set_order({"concurrent": 0, "in order": 1, "reversed": 2}[order])

    def count_banks(self, on: bool) -> None:
        self.lib.emu_bank_counting(int(on))

    def bank_stats(self) -> dict:
        """Shared-memory warp accesses since the last reset: their number, wavefronts, the worst conflict
        (n-way), how many had each degree, and per call site (file:line) the worst degree."""
        out = (ctypes.c_longlong * 10)()
        self.lib.emu_bank_stats(out)
        buf = ctypes.create_string_buffer(1 << 16)
        self.lib.emu_bank_sites(buf, len(buf))
        sites = {}
        for line in buf.value.decode().splitlines():
            site, worst, count = line.rsplit(" ", 2)
            sites[site] = (int(worst), int(count))
        return {"accesses": out[0], "wavefronts": out[1], "phases": out[2], "worst": out[3],
                "by_degree": dict(zip(("1", "2", "3-4", "5-8", "9-16", "17-32"), out[4:10])), "sites": sites}

    def bytes_moved(self) -> tuple[int, int]:
        loaded, stored = ctypes.c_longlong(), ctypes.c_longlong()
        self.lib.emu_bytes(ctypes.byref(loaded), ctypes.byref(stored))
        return loaded.value, stored.value

    def reset(self) -> None:
        self.lib.emu_reset()


@functools.cache
def _emulation(path: str) -> Emulation:
    return Emulation(Path(path))


def emulation_from(emulation_builds, name: str) -> Emulation:
    return _emulation(str(emulation_builds[name].result()))


# Settings small enough for the emulation's threads and forcing several tiles, planes and warps.
SMALL = Launch(loaders=32, scan_lanes=64, tile=4, smem=96 * 1024)


def point_backend_at(monkeypatch, emulation: Emulation) -> None:
    """cupy_backend's compile and launch hooks -> the emulation (kernels are named by their expression)."""
    monkeypatch.setattr(cupy_backend, "_kernels", lambda device_index, variant: _Names())
    monkeypatch.setattr(cupy_backend, "_launch", emulation.launch)


class _Names(dict):
    def __missing__(self, name):
        return name


# ---------------------------------------------------------------------------------------------
# Recorded launches, replayed by the standalone drivers (sanitizer builds) on their own buffers

_POINTERS = [("x", 0), ("lam", 0), ("u", 0), ("gate", 0), ("gate", 1), ("gate", 2), ("dy", 0), ("y", 0), ("dx", 0),
             ("dlam", 0), ("du", 0), ("dgate", 0), ("dgate", 1), ("dgate", 2), ("scratch", 0), ("part", 0), ("meta", 0)]
_OUTPUTS = {"y", "dx", "dlam", "du", "dgate", "scratch", "part"}
_TRANSIENT = ("scratch", "part", "meta")  # allocated per op and freed: never matched to the returned tensors


def record_case(monkeypatch, run) -> bytes:
    """One case of the driver's file: run() calls cupy_backend on CPU tensors and returns every tensor
    it passed or got back; its launches are recorded (not executed) with pointers as buffer references."""
    launches = []
    monkeypatch.setattr(cupy_backend, "_kernels", lambda device_index, variant: _Names())
    monkeypatch.setattr(cupy_backend, "_launch",
                        lambda kernel, name, grid, block, smem, args, device, what: launches.append(
                            (name, grid, block, smem, type(args).from_buffer_copy(args))))
    tensors = [t for t in run() if t is not None]
    buffers: list[tuple[int, int, int, int]] = []  # (bytes, kind: 0 input, 1 output, 2 zeroed, element bytes, fp16)
    of_tensor: dict[int, int] = {}                 # id(tensor) -> buffer index
    last: dict[str, tuple[int, int]] = {}           # transient field -> (address, buffer index) of the previous launch

    def transient_size(field: str, args) -> tuple[int, int]:
        if field == "scratch":
            return 4 * (args.N * args.scr_n if args.dirs == 4 else 3 * args.scr_k), 1
        if field == "part":
            return 4 * 3 * args.NC * args.HW, 1
        return 4 * 8 * -(-args.NC // args.lb), 2  # meta: zeroed

    def buffer_of(address: int, field: str, args) -> tuple[int, int]:
        if field in _TRANSIENT:  # freed after its op, so its address may be reused: never matched to tensors
            # the gate scratch is shared by a backward launch and its epilogue; the portable sum's partial
            # planes and zeroed tickets are fresh for every launch (torch.zeros per call in cupy_backend)
            if field != "scratch" or field not in last or last[field][0] != address:
                size, kind = transient_size(field, args)
                buffers.append((size, kind, 4, 0))
                last[field] = (address, len(buffers) - 1)
            return last[field][1], 0
        for t in tensors:
            base, size = t.data_ptr(), t.numel() * t.element_size()
            if base <= address < base + size:
                if id(t) not in of_tensor:
                    buffers.append((size, int(field in _OUTPUTS), t.element_size(), int(t.dtype == torch.float16)))
                    of_tensor[id(t)] = len(buffers) - 1
                return of_tensor[id(t)], address - base
        raise AssertionError(f"pointer {field} of a recorded launch matches no tensor")

    blobs = []
    for kernel, grid, block, smem, args in launches:
        for field in _TRANSIENT:
            if not getattr(args, field):
                last.pop(field, None)
        for field, k in _POINTERS:
            value = getattr(args, field)
            address = value[k] if field in ("gate", "dgate") else value
            if not address:
                continue
            index, offset = buffer_of(address, field, args)
            ref = ((index + 1) << 48) | offset
            if field in ("gate", "dgate"):
                getattr(args, field)[k] = ref
            else:
                setattr(args, field, ref)
        blobs.append(kernel.encode().ljust(64, b"\0") + struct.pack("<3i", grid, block, smem) + bytes(args))
    head = struct.pack("<i", len(buffers)) + b"".join(struct.pack("<q3i", *b) for b in buffers)
    return head + struct.pack("<i", len(blobs)) + b"".join(blobs)


def run_driver(path: Path, cases: list[bytes], tmp_path: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """Replay recorded cases in a driver executable; returns the finished process (stdout, stderr, code)."""
    file = tmp_path / "cases.bin"
    file.write_bytes(struct.pack("<i", len(cases)) + b"".join(cases))
    return subprocess.run(["nice", "-n", "10", str(path), str(file)], capture_output=True, text=True,
                          timeout=timeout, check=False)
