"""Launch plans of the GSPN CUDA kernels and their design figures, computed without a GPU.

A plan fixes how one launch runs: planes per CTA (``lb``), positions per scan lane (``R``), warps per line,
steps per staged tile (``ts``), pipeline stages (``S``) and, per line kind (``struct Geo`` in
cuda/gspn_common.cuh, mirrored by ``Geo`` here), the shared-memory layout and the backward's resident
lookahead ``D`` (tiles its first pass copies the gates and dy ahead beyond the ring's S - 1, straight into
the resident arrays, so they need no staging buffer). Both CUDA variants run the same plan:

  cluster   (sm_90+)  clusters of 4 CTAs, CTA d scans direction d of a group of planes; the four fp32
                      partial planes are summed through distributed shared memory;
  portable  (sm_80+)  the same 4 CTAs per group without a cluster; the last CTA of a group to finish sums
                      the others' fp32 partial planes from a global scratch (through L2) in the same
                      fixed order, so both variants give bitwise identical results.

The planner picks, among the plans that fit a device's shared memory per block, the one with the most
scan lanes per SM (up to ``LANES_SM``), then the most load bytes in flight per SM (up to ``INFLIGHT_SM``),
then the most planes per CTA; the backward's D is the least that brings its first pass to ``INFLIGHT_SM``.
``design`` gives a plan's figures: threads, CTAs, CTAs per SM and what limits them, bytes in flight per SM,
bytes by design against the floor, and a modelled fraction of the copy bandwidth (``python
benchmarks/kernel_bench.py --plans`` prints them for every target architecture).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, fields

import torch

__all__ = [
    "ARCHS",
    "LINE_WARPS",
    "MAX_LINE",
    "R_VALUES",
    "VARIANTS",
    "Device",
    "Geo",
    "Launch",
    "Plan",
    "design",
    "fits",
    "largest_square",
    "mix_traffic",
    "plan",
]

R_VALUES = (1, 2, 4, 8)           # positions per scan lane (template parameter R)
LINE_WARPS = (1, 2, 4)            # warps holding one line
MAX_LINE = 32 * LINE_WARPS[-1] * R_VALUES[-1]  # longest line: 4 warps x 32 lanes x 8 positions
VARIANTS = ("cluster", "portable")
LANES_SM = 256                    # scan lanes per SM the planner aims for (2 warps per scheduler)
INFLIGHT_SM = 32 * 1024           # load bytes in flight per SM the planner aims for
TAB_EXTRA = 16                    # bytes after the offset tables: the portable variant's ticket


@dataclass(frozen=True)
class Device:
    """What a plan needs of a GPU (per block / per SM limits) and what the design model needs."""

    name: str
    sm: int                       # compute capability x 10
    smem_block: int               # opt-in dynamic shared memory per block
    smem_sm: int                  # shared memory per SM
    threads_sm: int
    ctas_sm: int
    sms: int
    regs_sm: int = 65536
    clock_ghz: float | None = None   # sustained SM clock under load (a lead)
    copy_bw: float | None = None     # device-to-device copy, bytes/s counting read + write
    l2_bytes: int | None = None
    source: str = ""


# Representative cards. Limits from the CUDA programming guide's table of compute capabilities; clocks and
# copy bandwidths are leads (datasheet x 0.86 where nothing was measured) until a GPU run measures them.
ARCHS = {
    "sm_80": Device("NVIDIA A100-SXM4-80GB", 80, 166912, 167936, 2048, 32, 108, clock_ghz=1.41, copy_bw=1.75e12,
                    l2_bytes=40 << 20, source="copy bw: 0.86 x the 2.04 TB/s datasheet (lead)"),
    "sm_86": Device("NVIDIA A40", 86, 101376, 102400, 1536, 16, 84, clock_ghz=1.74, copy_bw=0.60e12,
                    l2_bytes=6 << 20, source="copy bw: 0.86 x the 696 GB/s datasheet (lead)"),
    "sm_89": Device("NVIDIA L40S", 89, 101376, 102400, 1536, 24, 142, clock_ghz=2.52, copy_bw=0.74e12,
                    l2_bytes=96 << 20, source="copy bw: 0.86 x the 864 GB/s datasheet (lead)"),
    "sm_90": Device("NVIDIA H100 80GB HBM3", 90, 232448, 233472, 2048, 32, 132, clock_ghz=1.755, copy_bw=3.0e12,
                    l2_bytes=50 << 20, source="copy bw: ~3.0 TB/s measured on an H100 of this workplace"),
}

# Registers per thread the planner assumes for gspn_mix's kernels when it has no compiled kernel to ask. Forward:
# the most ptxas (NVRTC 13) gives over sm_80, sm_86, sm_89 and sm_90, every dtype and variant (58 / 69 / 91 / 112
# for R = 1 / 2 / 4 / 8). Backward: the caps the kernels are compiled with (__maxnreg__, backward_regs in
# gspn_backward.cu; ptxas gives 93-129 / 95-125 / 96-130 / 121-173). kernel_bench.py --plans lists them, the
# compile test checks them. On a GPU the planner uses the loaded kernels' own counts.
ASSUMED_REGS = {"fwd": {1: 64, 2: 72, 4: 96, 8: 120}, "bwd": {1: 128, 2: 128, 4: 136, 8: 176}}


@dataclass(frozen=True)
class Launch:
    """Launch settings; the defaults serve every shape, tests and the benchmark's --tune vary them.

    loaders: threads per CTA beside the scan warps (a multiple of 32); they issue the asynchronous tile
        copies and write the backward's results.
    scan_lanes: most scan lanes per CTA: planes per CTA <= scan_lanes / lanes per line, and a long line on
        few planes gets up to `line_warps` warps.
    line_warps: most warps holding one line (1, 2 or 4).
    tile: most scan steps per staged tile (a power of two).
    stages: pipeline depth (tiles staged at once, 2 or 3); None lets the planner choose.
    lookahead: the backward's resident lookahead D (tiles beyond the ring's S - 1 its first pass loads the
        gates and dy ahead); None lets the planner choose, 0 keeps those copies with the ring.
    smem: shared-memory budget per CTA in bytes; None = the device's opt-in maximum.
    """

    loaders: int = 64
    scan_lanes: int = 128
    line_warps: int = 4
    tile: int = 16
    stages: int | None = None
    lookahead: int | None = None
    smem: int | None = None


@dataclass(frozen=True)
class Geo:
    """One line kind's plan; the fields of ``struct Geo`` (gspn_common.cuh), in order, then `end`.

    Column lines (d = 0, 1) stage their maps transposed in "pair rows": word (s >> sh) * Qw + q holds
    the element of position q (= plane slot * Ps + p) at steps s and s + 1 (16-bit types, sh = 1) or s
    alone (fp32), so that 4-byte asynchronous copies can move global rows (contiguous in s) and a lane
    reads its R positions of one step as one vector. Row lines stage [step][q] elements.
    """

    P: int
    L: int
    G: int
    W: int
    nt: int
    Ps: int
    Q: int
    Qw: int
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
    xchg: int
    D: int    # backward: resident lookahead, tiles beyond the ring's S - 1 (0 in the forward and until planned)
    end: int  # bytes of shared memory this kind uses (not passed to the kernel)


@dataclass(frozen=True)
class Plan:
    R: int
    lb: int
    ts: int
    S: int
    V: int
    gmode: int
    loaders: int
    threads: int
    smem: int
    groups: int
    geo: tuple[Geo, Geo]   # column lines, row lines


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def _roundup(v: int, m: int) -> int:
    return -(-v // m) * m


def _a16(v: int) -> int:
    return _roundup(v, 16)


def _word_pitch(q: int) -> int:
    """Words per pair row for q positions: >= q, a multiple of 4 with an odd quotient. Copies write 8 words
    x 4 positions per warp: banks 4 m w + q (m odd) are all 32 distinct; lanes read R <= 4 words 16-byte
    aligned."""
    w = _roundup(q, 4)
    return w + 4 if (w // 4) % 2 == 0 else w


def _line(P: int, R: int, w_max: int) -> tuple[int, int] | None:
    """(warps W, lanes per warp G) holding a line of P positions at R per lane, or None if it needs more
    than w_max warps. One warp when it fits (G lanes, a power of two); else W whole warps (G = 32)."""
    if P <= 32 * R:
        return 1, min(32, _next_pow2(-(-P // R)))
    W = _next_pow2(-(-P // (32 * R)))
    return (W, 32) if W <= w_max else None


@functools.lru_cache(maxsize=4096)
def _geo(col: bool, P: int, L: int, R: int, line: tuple[int, int], lb: int, ts: int, S: int, e: int,
         backward: bool, mix: bool, gmode: int) -> Geo:
    """Shared-memory layout of one line kind (the order gspn_common.cuh describes), 16-byte aligned."""
    W, G = line
    pk = 4 // e                              # elements per 4-byte word
    Ps = _roundup(P, max(R, 16 // e))        # positions per plane slot (16-byte rows, R-aligned lanes)
    Q = lb * Ps
    Qw = _word_pitch(Q)
    Pp = _roundup(P, max(4, R))
    if (Pp // 4) % 2 == 0:
        Pp += 4  # 16-byte column reads of the plane (write phase): an odd number of 16-byte units per row
    nscan = 32 * -(-lb * G * W // 32)

    def tile_t(steps: int) -> int:          # one T array of `steps` steps
        return _a16(-(-steps // pk) * Qw * 4) if col else _a16(steps * Q * e)

    def tile_f(steps: int) -> int:          # one fp32 array
        return _a16(steps * Qw * 4) if col else _a16(steps * Q * 4)

    at = _a16(4 * lb * 8 + TAB_EXTRA)       # offset tables, ticket
    stage_arr = tile_t(ts)
    stage_buf = (2 if backward else (6 if mix else 5)) * stage_arr
    stage, at = at, at + S * stage_buf
    plane, at = at, at + _a16(lb * L * Pp * 4)
    res_arr = (tile_t(L) if col else _a16(lb * L * Ps * e)) if backward else 0
    res, at = at, at + 4 * res_arr
    ostage_t = tile_t(ts) if backward else 0
    ostage_f = tile_f(ts) if backward else 0
    ostage_buf = 2 * ostage_t + 3 * (ostage_t if gmode == 0 else ostage_f)
    ostage, at = at, at + 2 * ostage_buf
    xchg, at = at, at + (_a16(2 * lb * W * 2 * 4) if W > 1 else 0)
    return Geo(P, L, G, W, -(-L // ts), Ps, Q, Qw, Pp, nscan, stage, stage_arr, stage_buf, plane, res, res_arr,
               ostage, ostage_t, ostage_f, ostage_buf, xchg, 0, at)


def ctas_per_sm(threads: int, smem: int, regs: int, device: Device) -> tuple[int, str]:
    """Resident CTAs per SM of a plan and what limits them (smem, threads, registers or the CTA limit)."""
    warps = -(-threads // 32)
    regs_warp = _roundup(_roundup(max(regs, 1), 8) * 32, 256)
    limits = {"smem": device.smem_sm // (smem + 1024), "threads": device.threads_sm // (32 * warps),
              "registers": device.regs_sm // (regs_warp * warps), "ctas": device.ctas_sm}
    kind = min(limits, key=limits.get)
    return limits[kind], kind


def resident_ahead(S: int, D: int, nt: int) -> int:
    """Tiles of the resident arrays the backward's first pass has in flight in steady state: S - 1 + D, at
    most the tiles after the current one (and never fewer than the ring's S - 1)."""
    return max(S - 1, min(S - 1 + D, nt - 1))


def _first_pass_in_flight(p: Plan, g: Geo, D: int, e: int, mix: bool) -> int:
    """Load bytes one CTA of the backward has in flight in its first pass on line kind g with lookahead D:
    S - 1 tiles of u, `resident_ahead` tiles of the 3 gates and dy."""
    return ((p.S - 1) * int(mix) + resident_ahead(p.S, D, g.nt) * 4) * p.ts * p.lb * g.P * e


def _loads_in_flight(p: Plan, e: int, backward: bool, mix: bool) -> int:
    """Load bytes one CTA has in flight by design, the least over its phases and line kinds: S - 1 tiles
    of every array it stages (forward: x, lam, u, 3 gates; backward pass 1: u, and the 3 gates and dy
    `resident_ahead` tiles ahead; pass 2: x, lam)."""
    least = None
    for g in p.geo:
        tile = p.ts * p.lb * g.P * e
        if backward:
            phases = [_first_pass_in_flight(p, g, g.D, e, mix), (p.S - 1) * 2 * tile]
        else:
            phases = [(p.S - 1) * (6 if mix else 5) * tile]
        least = min([least, *phases] if least is not None else phases)
    return least


def _lookahead(p: Plan, g: Geo, e: int, mix: bool, ctas: int, launch: Launch) -> int:
    """The backward's D for line kind g: launch.lookahead, else the least that brings the first pass's load
    bytes in flight per SM to INFLIGHT_SM (or as far as the kind's tiles go)."""
    if launch.lookahead is not None:
        return launch.lookahead
    most = max(0, g.nt - p.S)
    return next((D for D in range(most) if ctas * _first_pass_in_flight(p, g, D, e, mix) >= INFLIGHT_SM), most)


@functools.lru_cache(maxsize=1024)
def plan(N: int, C: int, Cg: int, H: int, W: int, e: int, backward: bool, mix: bool, vec_ok: bool, launch: Launch,
         device: Device, regs: tuple[int, ...] | None = None) -> Plan | None:
    """The launch plan, or None when no plan fits the shared memory or the line is too long.

    Candidates: 16-byte vectors (tiles of at least 16 / e steps) when W and the pointers (vec_ok) allow;
    every number of planes per CTA lb <= launch.scan_lanes / lanes per line, with the least R that holds
    both line kinds, every tile <= launch.tile and 3 or 2 stages that fit. With compact gates the
    backward takes lb a multiple of C / Cg where one fits (the gate gradient is then summed inside the
    CTA, gmode 1), else gmode 2 (per-channel scratch + epilogue). Among the candidates: the most scan
    lanes per SM up to LANES_SM, then the most load bytes in flight per SM up to INFLIGHT_SM, then the
    longest tile, the deepest pipeline, the most planes per CTA. regs: registers per thread of the
    kernel for R = 1, 2, 4, 8 (default ASSUMED_REGS).
    """
    if max(H, W) > 32 * R_VALUES[-1] * launch.line_warps:
        return None
    smem_limit = launch.smem if launch.smem is not None else device.smem_block
    kk, NC = C // Cg, N * C
    target = min(NC, max(1, launch.scan_lanes // min(32, _next_pow2(max(H, W)))))
    lbs = [lb for lb in range(target, 0, -1) if not backward or kk == 1 or lb % kk == 0 or lb < kk]
    vm = 16 // e
    vectors = vec_ok and W % vm == 0
    ts_top = max(1, min(launch.tile, _next_pow2(max(H, W))))
    tiles = [1 << k for k in range(ts_top.bit_length() - 1, -1, -1)]
    stages = (launch.stages,) if launch.stages else (3, 2)
    reg_table = dict(zip(R_VALUES, regs)) if regs else ASSUMED_REGS["bwd" if backward else "fwd"]
    for ts_min in ((vm, 1) if vectors else (1,)):
        candidates = []
        for lb in lbs:
            # warps a line may take: the lanes left per plane, a power of two; 15 named barriers at most
            spare = launch.scan_lanes // (32 * lb)
            w_max = 1 if lb > 15 or spare < 2 else min(launch.line_warps, 1 << (spare.bit_length() - 1))
            R = next((r for r in R_VALUES if all(_line(P, r, w_max) for P in (H, W))), None)
            if R is None:
                continue
            gmode = 0 if kk == 1 else (1 if lb % kk == 0 else 2)
            for ts in (t for t in tiles if t >= ts_min):
                for S in stages:
                    kinds = tuple(_geo(col, P, L, R, _line(P, R, w_max), lb, ts, S, e, backward, mix, gmode)
                                  for col, P, L in ((True, H, W), (False, W, H)))
                    smem = max(k.end for k in kinds)
                    threads = max(k.nscan for k in kinds) + launch.loaders
                    if smem > smem_limit or threads > 1024:
                        continue
                    V = vm if vectors and ts % vm == 0 else 1
                    p = Plan(R, lb, ts, S, V, gmode if backward else 0, launch.loaders, threads, smem, -(-NC // lb),
                             kinds)
                    k, _ = ctas_per_sm(p.threads, p.smem, reg_table[p.R], device)
                    if backward:
                        geo = tuple(dataclasses.replace(g, D=_lookahead(p, g, e, mix, k, launch)) for g in p.geo)
                        p = dataclasses.replace(p, geo=geo)
                    lanes = k * max(g.nscan for g in p.geo)
                    inflight = k * _loads_in_flight(p, e, backward, mix)
                    candidates.append(((min(lanes, LANES_SM), min(inflight, INFLIGHT_SM), ts, S, lb), p))
        if candidates:
            return max(candidates, key=lambda c: c[0])[1]
    return None


def fits(N: int, C: int, Cg: int, H: int, W: int, dtype: torch.dtype, device: Device,
         launch: Launch | None = None) -> bool:
    """Whether forward and backward launch plans exist for these shapes on the device."""
    e = dtype.itemsize
    return all(plan(N, C, Cg, H, W, e, bwd, True, True, launch or Launch(), device) is not None
               for bwd in (False, True))


# ---------------------------------------------------------------------------------------------
# Bytes by design


def _floors(N: int, C: int, Cg: int, H: int, W: int, e: int) -> tuple[int, int]:
    """Bytes of reading each input once and writing each output once: forward, backward (all gradients)."""
    px = N * H * W
    return ((C + 12 * Cg + 8 * C + C) * px * e,
            (2 * C + 12 * Cg + 8 * C) * px * e + (C + 12 * Cg + 8 * C) * px * e)


def _moved(p: Plan, N: int, C: int, Cg: int, H: int, W: int, e: int, backward: bool, variant: str) -> tuple[int, int]:
    """(bytes the kernels of one pass move, of which the portable sum's fp32 partial planes read back)."""
    HW, NC, kk = H * W, N * C, C // Cg
    planes = gate_planes = 0
    for group in range(p.groups):  # gate planes of a group: those its planes use
        pl0 = group * p.lb
        n = min(p.lb, NC - pl0)
        planes += n
        gate_planes += (pl0 + n - 1) // kk - pl0 // kk + 1
    if not backward:  # per direction: x, lam, u, 3 gate maps read; y written once
        moved = 4 * (3 * planes + 3 * gate_planes) * HW * e + NC * HW * e
    else:  # per direction: 3 gate maps, dy, u, x, lam read; dlam, du and the gate gradients written
        moved = 4 * (4 * planes + 3 * gate_planes) * HW * e + 4 * 2 * planes * HW * e + NC * HW * e
        if p.gmode == 2:  # fp32 per-channel gate gradients, then the epilogue
            moved += 4 * 3 * planes * HW * 4 + (4 * 3 * NC * HW * 4 + 4 * 3 * N * Cg * HW * 2 * e)
        else:
            moved += 4 * 3 * gate_planes * HW * e
    combine = 3 * NC * HW * 4 if variant == "portable" else 0
    return moved + 2 * combine, combine


def _plan_summary(p: Plan) -> dict:
    return {"planes_per_cta": p.lb, "tile": p.ts, "stages": p.S, "lookahead": [g.D for g in p.geo],
            "vector": p.V, "threads": p.threads, "smem": p.smem, "R": p.R, "line_warps": max(g.W for g in p.geo),
            "gmode": p.gmode}


def mix_traffic(N: int, C: int, Cg: int, H: int, W: int, dtype: torch.dtype, launch: Launch | None = None,
                device: Device = ARCHS["sm_90"], variant: str = "cluster") -> dict:
    """Global-memory bytes gspn_mix moves by construction (forward; backward with all four gradients),
    from the launch plans, next to the floor (each input read once, each output written once).

    Counts every load and store the kernels issue (the CPU emulation checks that it counts the same). The
    portable variant adds the direction sum's fp32 partial planes: three written and read back per group
    ("fwd_combine_write" / "fwd_combine_read", the same for "bwd"); the reads follow the writes by
    microseconds, so they are L2 hits while the resident CTAs' partial planes fit the L2.
    """
    launch = launch or Launch()
    e = dtype.itemsize
    floor_fwd, floor_bwd = _floors(N, C, Cg, H, W, e)
    out = {"floor_fwd": floor_fwd, "floor_bwd": floor_bwd}
    for backward in (False, True):
        p = plan(N, C, Cg, H, W, e, backward, True, True, launch, device)
        key = "bwd" if backward else "fwd"
        if p is None:
            out[key] = None
            continue
        out[key], combine = _moved(p, N, C, Cg, H, W, e, backward, variant)
        out[f"{key}_combine_write"] = out[f"{key}_combine_read"] = combine
        out[f"plan_{key}"] = _plan_summary(p)
    return out


# ---------------------------------------------------------------------------------------------
# Design figures and the bandwidth model

# Warp instructions the model counts. A scan lane issues per position and step (per direction, per pass)
# about: forward 105 (the three gates, ~80: three FMA-built exps, their fractions and one IEEE division,
# gspn_line.cuh; the step; shared-memory reads and conversions), backward 95 (pass 1: gates, adjoint) +
# 155 (pass 2: gates with 1 - sigmoid, one more division; step, gradients, output conversions); estimated
# from the source, a lead until a GPU run calibrates it. Loaders: ~4 instructions per 128 bytes copied (a
# copy and its address arithmetic), ~25 per 512 bytes stored (reads of the output tile, packing, the store).
INSTR_PER_POSITION = {("mix", "fwd"): (105,), ("mix", "bwd"): (95, 155)}
LOAD_INSTR_PER_BYTE = 4 / 128
STORE_INSTR_PER_BYTE = 25 / 512
STEP_LATENCY_CYCLES = 40     # dependency chain of one step after its independent work (shuffle, FMAs)
DRAM_LATENCY_S = 0.8e-6      # load latency under load
LAUNCH_OVERHEAD_S = 4e-6


def _phase_loads(p: Plan, e: int, backward: bool, gate_frac: float) -> list[tuple[float, int]]:
    """Per phase: (load bytes per plane-direction, load bytes one CTA keeps in flight)."""
    tile = p.ts * p.lb * sum(g.P for g in p.geo) / 2 * e   # one array's tile, the two kinds on average
    HW = p.geo[0].P * p.geo[0].L
    if not backward:
        return [((3 + 3 * gate_frac) * HW * e, int((p.S - 1) * 6 * tile))]
    ahead = sum(resident_ahead(p.S, g.D, g.nt) for g in p.geo) / 2   # resident tiles in flight, pass 1
    return [((2 + 3 * gate_frac) * HW * e, int((p.S - 1 + 4 * ahead) * tile)),
            (2 * HW * e, int((p.S - 1) * 2 * tile))]


def design(N: int, C: int, Cg: int, H: int, W: int, dtype: torch.dtype, backward: bool, variant: str,
           device: Device, regs: tuple[int, ...] | None = None, launch: Launch | None = None) -> dict | None:
    """The design figures of gspn_mix's plan (forward or backward) on a device, None when no plan fits.

    threads, ctas (grid), regs, smem, ctas_per_sm and its limiter, inflight_sm (load bytes in flight per SM
    by design, the least over the phases), scan_lanes_sm, bytes (by design; dram_bytes without the
    portable sum's L2 re-reads) / floor, and a modelled time, the largest of
      DRAM    dram bytes / copy bandwidth,
      Little  per phase, load bytes x latency / (SMs x bytes in flight per SM), summed over the phases,
      issue   waves x per wave the larger of (scan and loader warp instructions of the SM's CTAs / 4
              schedulers) and (the steps of one warp, each its own instructions plus its dependency latency),
    plus the launch; modelled_of_copy_bw = dram bytes / modelled time / copy bandwidth. regs: registers per
    thread of the kernel for R = 1, 2, 4, 8 (ptxas's; default ASSUMED_REGS), as plan() takes them.
    """
    launch = launch or Launch()
    e = dtype.itemsize
    p = plan(N, C, Cg, H, W, e, backward, True, True, launch, device, regs)
    if p is None:
        return None
    key = "bwd" if backward else "fwd"
    regs_p = dict(zip(R_VALUES, regs))[p.R] if regs else ASSUMED_REGS[key][p.R]
    k, limiter = ctas_per_sm(p.threads, p.smem, regs_p, device)
    grid = 4 * p.groups
    bytes_, l2_reads = _moved(p, N, C, Cg, H, W, e, backward, variant)
    floor = _floors(N, C, Cg, H, W, e)[int(backward)]
    dram = bytes_ - l2_reads
    phases = _phase_loads(p, e, backward, Cg / C)
    inflight = k * min(f for _, f in phases)
    out = {"threads": p.threads, "ctas": grid, "regs": regs_p, "smem": p.smem, "ctas_per_sm": k,
           "ctas_per_sm_limit": limiter, "inflight_sm": inflight, "inflight_sm_by_phase": [k * f for _, f in phases],
           "scan_lanes_sm": k * max(g.nscan for g in p.geo),
           "bytes": bytes_, "dram_bytes": dram, "l2_reads": l2_reads, "floor": floor, "bytes_x_floor": bytes_ / floor,
           "dram_x_floor": dram / floor, "plan": _plan_summary(p)}
    if not (device.copy_bw and device.clock_ghz):
        return out
    hz = device.clock_ghz * 1e9
    plane_dirs = 4 * N * C
    t_dram = dram / device.copy_bw
    t_little = sum(loads * plane_dirs * DRAM_LATENCY_S / (device.sms * k * f) for loads, f in phases)
    # Little's law per phase: the load bytes in flight per SM that keep the copy bandwidth busy given the
    # phase's share of loads in its traffic (forward and backward pass 1 nearly all loads; pass 2 loads x
    # and lam and stores the gradients)
    loads = [ld * plane_dirs for ld, _ in phases]
    traffic_by_phase = [dram] if len(phases) == 1 else [loads[0], dram - loads[0]]
    out["needed_sm_by_phase"] = [int(min(1.0, ld / tr) * device.copy_bw * DRAM_LATENCY_S / device.sms)
                                 for ld, tr in zip(loads, traffic_by_phase)]
    steps = (H + W) / 2                                    # steps of one pass, the two line kinds on average
    ipp = INSTR_PER_POSITION[("mix", key)]
    warps = max(g.nscan for g in p.geo) // 32              # scan warps per CTA
    scan_instr = k * warps * sum(steps * p.R * i for i in ipp)
    stored = (bytes_ - dram + 2 * l2_reads - sum(loads for loads, _ in phases) * plane_dirs) / max(1, p.groups * 4)
    loaded = sum(loads for loads, _ in phases) * p.lb
    loader_instr = k * (loaded * LOAD_INSTR_PER_BYTE + max(0.0, stored) * STORE_INSTR_PER_BYTE)
    chain = sum(steps * (p.R * i + STEP_LATENCY_CYCLES) for i in ipp)
    waves = -(-grid // (device.sms * k))
    t_issue = waves * max((scan_instr + loader_instr) / 4, chain) / hz
    t = max(t_dram, t_little, t_issue) + LAUNCH_OVERHEAD_S
    bound = ("dram", "little", "issue")[[t_dram, t_little, t_issue].index(max(t_dram, t_little, t_issue))]
    out.update({"t_dram_us": t_dram * 1e6, "t_little_us": t_little * 1e6, "t_issue_us": t_issue * 1e6,
                "t_model_us": t * 1e6, "t_floor_us": floor / device.copy_bw * 1e6, "bound": bound,
                "modelled_of_copy_bw": dram / t / device.copy_bw})
    return out


def geo_fields() -> list[str]:
    """The fields of struct Geo passed to the kernel, in order."""
    return [f.name for f in fields(Geo) if f.name != "end"]


def largest_square(dtype: torch.dtype, device: Device, step: int = 8) -> int | None:
    """The largest square side (a multiple of `step`) whose forward and backward plans fit, None if none."""
    best = None
    for side in range(step, MAX_LINE + 1, step):
        if fits(1, 1, 1, side, side, dtype, device):
            best = side
    return best
