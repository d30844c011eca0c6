"""The emulated kernels under AddressSanitizer and ThreadSanitizer, and deliberately broken kernels that
these checks (or the oracle comparison) must catch.

The sanitizer builds are standalone drivers (cuda_emulation.cpp with -DEMU_MAIN) that replay launches
recorded from cupy_backend's own host code, both variants, on fresh buffers: random inputs, NaN-poisoned
outputs. They fail on an out-of-bounds access of global or shared memory (ASan; the shared-memory canary
is poisoned), on a race between threads of a CTA, of a cluster or of a portable group (TSan: a missing
__syncthreads, shuffle, cluster barrier or ticket wait), on an emulation error (misaligned access, a
shared-memory overrun, an asynchronous copy never waited for) and on an output element left unwritten.
"""

import pytest
import torch
from gspn_gen.kernels import cupy_backend, testing
from gspn_gen.kernels.cuda_plan import Launch

from tests.helpers import backend
from tests.kernels.emulation import SMALL, emulation_from, point_backend_at, record_case, run_driver

NARROW = Launch(loaders=32, scan_lanes=16, tile=4, smem=96 * 1024)

# (N, C, Cg, H, W), chunk, dtype, launch, gspn_mix variants: tiling, chunks, long lines, compact gates,
# vectors, partial groups; every path in one variant at least, the bf16 vector case in both
CASES = [
    ((1, 4, 2, 9, 8), 3, torch.float32, SMALL, ("cluster", "portable")),  # several tiles, chunk not dividing, gmode 1
    ((1, 3, 3, 37, 5), None, torch.float32, SMALL, ("portable",)),        # 2 positions per lane, partial group
    ((1, 2, 1, 4, 70), 4, torch.float32, NARROW, ("cluster",)),           # row lines of 70, gate scratch (gmode 2)
    ((2, 2, 2, 8, 16), 5, torch.bfloat16, Launch(loaders=32, scan_lanes=32, tile=8, smem=96 * 1024),
     ("cluster", "portable")),                                            # bf16 copies of 16 and 4 bytes
    ((1, 2, 2, 12, 20), None, torch.float32, Launch(loaders=32, scan_lanes=32, tile=4, stages=2, lookahead=2,
                                                    smem=96 * 1024), ("portable",)),  # resident tiles 3 ahead
    ((1, 1, 1, 70, 9), 4, torch.float32, Launch(loaders=32, scan_lanes=128, tile=4, smem=96 * 1024),
     ("cluster",)),                                                       # 4 warps per line (the last case)
]


def _mix_and_scan(shape, chunk, dtype, launch, variants):
    """Forward and backward of gspn_mix (in the given variants) and gspn_scan through cupy_backend; every
    tensor involved."""
    (x, logits, lam, u), dy = testing.mix_inputs(*shape, dtype)
    out = [x, logits, lam, u, dy]
    for variant in variants:
        out.append(cupy_backend.mix_forward(x, logits, lam, u, chunk, launch=launch, variant=variant))
        out += cupy_backend.mix_backward(dy, x, logits, lam, u, chunk, (True,) * 4, launch=launch, variant=variant)
    (xs, lams, *gates), dh = testing.scan_inputs(*shape, dtype)
    h = cupy_backend.scan_forward(xs, lams, *gates, chunk, launch=launch)
    sgrads = cupy_backend.scan_backward(dh, xs, lams, *gates, chunk, (True,) * 5, launch=launch)
    return [*out, xs, lams, *gates, dh, h, *sgrads]


@pytest.fixture(scope="module")
def cases():
    """The recorded launches of CASES (recorded once; pointers become references to the driver's buffers)."""
    with pytest.MonkeyPatch.context() as mp:
        return [record_case(mp, lambda c=c: _mix_and_scan(*c)) for c in CASES]


@pytest.mark.parametrize("build", ["asan", "tsan"])
def test_sanitizer_clean(emulation_builds, cases, build, tmp_path):
    done = run_driver(emulation_builds[build].result(), cases, tmp_path)
    assert done.returncode == 0, f"{build}: exit {done.returncode}\n{done.stderr[-6000:]}"
    assert f"replayed {len(CASES)} cases" in done.stdout


def test_broken_index_fails_the_oracle_comparison(emulation_builds, monkeypatch):
    """Each scan lane storing its plane one position too far must not pass (the oracle or the
    shared-memory canary catches it)."""
    point_backend_at(monkeypatch, emulation_from(emulation_builds, "mutant_index"))
    mix = testing.backend_mix(backend(SMALL))
    with pytest.raises((AssertionError, RuntimeError)):
        testing.check_mix(mix, (1, 2, 2, 6, 5), torch.float32, None)


def test_removed_tile_barrier_is_a_reported_race(emulation_builds, cases, tmp_path):
    """Without the barrier that opens each tile, the loaders' copies land in a buffer the scan lanes are
    reading: ThreadSanitizer reports the race."""
    done = run_driver(emulation_builds["mutant_barrier"].result(), cases[:1], tmp_path)
    assert done.returncode != 0 and "ThreadSanitizer: data race" in done.stderr, done.stderr[-3000:]


def test_removed_line_barrier_is_a_reported_race(emulation_builds, cases, tmp_path):
    """Without the named barrier of a line held by several warps, a warp reads the exchange slots its
    neighbour is writing: ThreadSanitizer reports the race."""
    done = run_driver(emulation_builds["mutant_line"].result(), cases[-1:], tmp_path)
    assert done.returncode != 0 and "ThreadSanitizer: data race" in done.stderr, done.stderr[-3000:]


def test_removed_copy_wait_fails(emulation_builds, monkeypatch):
    """Without the loaders' wait for the oldest tile, the scan lanes read staging buffers before their
    asynchronous copies land (the 0xFF fill): the oracle comparison fails or the emulation reports
    copies never waited for."""
    point_backend_at(monkeypatch, emulation_from(emulation_builds, "mutant_wait"))
    mix = testing.backend_mix(backend(Launch(loaders=32, scan_lanes=64, tile=4, stages=3, smem=96 * 1024)))
    with pytest.raises((AssertionError, RuntimeError)):
        testing.check_mix(mix, (1, 2, 2, 6, 16), torch.float32, None)


def test_removed_ticket_wait_is_caught(emulation_builds, cases, tmp_path):
    """Without the portable sum's wait for the other three CTAs of a group, the last one reads partial
    planes and directions still being written: ThreadSanitizer reports the race (or the sum reads
    unwritten values)."""
    done = run_driver(emulation_builds["mutant_ticket"].result(), cases[:2], tmp_path)
    assert done.returncode != 0, done.stderr[-3000:]
    assert "ThreadSanitizer: data race" in done.stderr or "non-finite" in done.stderr


def test_removed_cluster_barrier_is_caught(emulation_builds, cases, tmp_path):
    """Without the cluster barrier before the sum, a CTA reads planes the others are still writing: the
    emulation refuses a distributed-shared-memory read before any cluster barrier (ThreadSanitizer's
    sampled shadow memory may or may not see the race itself)."""
    done = run_driver(emulation_builds["mutant_cluster"].result(), cases[:1], tmp_path)
    assert done.returncode != 0, done.stderr[-3000:]
    assert "read before any cluster barrier" in done.stderr or "ThreadSanitizer: data race" in done.stderr
