"""The oracle of the GSPN propagation (kernels/reference.py) against a second, independent one.

`naive_mix` / `naive_scan` are written here from DESIGN.md §3 alone, sharing no code with the oracle:
numpy float64, one Python loop step per pixel, each direction spelled out with its own visiting order
and neighbours. The structure tests (cones, gates, chunks, rounding) pin the semantics on the oracle,
which every backend is then compared with (tests/kernels/test_torch_backend.py, the CUDA tests).
"""

import numpy as np
import pytest
import torch
from gspn_gen.kernels import testing
from gspn_gen.kernels.reference import gspn_mix_reference, gspn_scan_reference, stability_gates

# (N, C, Cg, H, W, chunk): H != W, H = 1, W = 1, odd sizes, chunks that divide nothing, compact gates
SHAPES = [
    (2, 4, 2, 5, 7, None),
    (1, 3, 3, 4, 4, None),
    (1, 3, 1, 1, 6, None),
    (2, 2, 1, 6, 1, None),
    (1, 1, 1, 1, 1, None),
    (1, 4, 4, 5, 5, 2),
    (2, 6, 2, 7, 4, 3),
    (1, 2, 1, 3, 5, 1),
    (1, 4, 1, 4, 6, 4),
    (1, 2, 2, 5, 3, 10),
]


def mix_inputs(n, c, cg, h, w, dtype=torch.float64, seed=0):
    return testing.mix_inputs(n, c, cg, h, w, dtype, seed=seed)[0]


def scan_inputs(n, c, cg, h, w, dtype=torch.float64, seed=0):
    return testing.scan_inputs(n, c, cg, h, w, dtype, seed=seed)[0]


def grads(fn, inputs, dy, *args):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves, *args)
    return [out.detach(), *torch.autograd.grad(out, leaves, dy)]


# ---------------------------------------------------------------------------------------------
# Oracle 1: per pixel, numpy float64, straight from DESIGN.md §3
# ---------------------------------------------------------------------------------------------

def _same_block(a, b, chunk):
    return chunk is None or a // chunk == b // chunk


def _direction(d, h, w):
    """Visiting order of pixels, the previous-line pixel of (i, j) at offset o, the line index of
    (i, j) and the line length, for direction d (0 L->R, 1 R->L, 2 T->B, 3 B->T)."""
    if d == 0:
        return ([(i, j) for j in range(w) for i in range(h)], lambda i, j, o: (i + o, j - 1),
                lambda i, j: i, h, lambda i, j: j, lambda i, j: j - 1)
    if d == 1:
        return ([(i, j) for j in reversed(range(w)) for i in range(h)], lambda i, j, o: (i + o, j + 1),
                lambda i, j: i, h, lambda i, j: j, lambda i, j: j + 1)
    if d == 2:
        return ([(i, j) for i in range(h) for j in range(w)], lambda i, j, o: (i - 1, j + o),
                lambda i, j: j, w, lambda i, j: i, lambda i, j: i - 1)
    return ([(i, j) for i in reversed(range(h)) for j in range(w)], lambda i, j, o: (i + 1, j + o),
            lambda i, j: j, w, lambda i, j: i, lambda i, j: i + 1)


def _naive_direction(a, gate_at, d, chunk):
    """h for direction d: a (N, C, H, W) = lam_d * x; gate_at(i, j, o) -> (N, C) gate of offset o."""
    _, _, h, w = a.shape
    order, neighbour, _, _, scan_index, prev_scan_index = _direction(d, h, w)
    out = np.zeros_like(a)
    for i, j in order:
        out[:, :, i, j] = a[:, :, i, j]
        s, sp = scan_index(i, j), prev_scan_index(i, j)
        length = w if d < 2 else h
        if not (0 <= sp < length and _same_block(s, sp, chunk)):
            continue  # first line, or first line of a block: h of the previous line is taken as 0
        for o in (-1, 0, 1):
            ii, jj = neighbour(i, j, o)
            if 0 <= (ii if d < 2 else jj) < (h if d < 2 else w):
                out[:, :, i, j] += gate_at(i, j, o) * out[:, :, ii, jj]
    return out


def naive_mix(x, logits, lam, u, chunk=None):
    x, logits, lam, u = (t.detach().double().numpy() for t in (x, logits, lam, u))
    _, c, h, w = x.shape
    serves = np.arange(c) // (c // logits.shape[3])  # gate channel of each x channel
    y = np.zeros_like(x)
    for d in range(4):
        _, _, line_index, line_len, _, _ = _direction(d, h, w)

        def gate_at(i, j, o, d=d, line_index=line_index, line_len=line_len):
            q = line_index(i, j)
            s = {oo: (1 / (1 + np.exp(-logits[:, d, oo + 1, :, i, j])) if 0 <= q + oo < line_len else 0.0)
                 for oo in (-1, 0, 1)}
            return (s[o] / (s[-1] + s[0] + s[1]))[:, serves]

        y += u[:, d] * _naive_direction(lam[:, d] * x, gate_at, d, chunk)
    return torch.from_numpy(y)


def naive_scan(x, lam, g_up, g_mid, g_down, chunk=None):
    x, lam, *gs = (t.detach().double().numpy() for t in (x, lam, g_up, g_mid, g_down))
    serves = np.arange(x.shape[1]) // (x.shape[1] // gs[0].shape[1])
    out = _naive_direction(lam * x, lambda i, j, o: gs[o + 1][:, serves, i, j], 0, chunk)
    return torch.from_numpy(out)


# ---------------------------------------------------------------------------------------------
# Forward against the per-pixel oracle
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
def test_mix_matches_naive_oracle(shape):
    *dims, chunk = shape
    inputs = mix_inputs(*dims, seed=sum(dims))
    expected = naive_mix(*inputs, chunk)
    torch.testing.assert_close(gspn_mix_reference(*inputs, chunk), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", SHAPES)
def test_scan_matches_naive_oracle(shape):
    *dims, chunk = shape
    inputs = scan_inputs(*dims, seed=sum(dims))
    expected = naive_scan(*inputs, chunk)
    torch.testing.assert_close(gspn_scan_reference(*inputs, chunk), expected, rtol=1e-10, atol=1e-10)


def test_naive_oracle_hand_example():
    """The oracle itself on a case worked by hand: 1 x 2 map, L->R only, equal logits, lam = u = 1."""
    x = torch.tensor([[[[2.0, 3.0]]]], dtype=torch.float64)
    logits = torch.zeros(1, 4, 3, 1, 1, 2, dtype=torch.float64)
    lam = torch.ones(1, 4, 1, 1, 2, dtype=torch.float64)
    u = torch.zeros_like(lam)
    u[:, 0] = 1
    # H = 1: only the mid neighbour exists, so its gate is 1 and h = [2, 3 + 2]
    expected = torch.tensor([[[[2.0, 5.0]]]], dtype=torch.float64)
    torch.testing.assert_close(naive_mix(x, logits, lam, u), expected)
    torch.testing.assert_close(gspn_mix_reference(x, logits, lam, u), expected)


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dims,chunk", [((1, 2, 1, 3, 4), None), ((1, 4, 2, 4, 3), 2)])
def test_gradcheck_mix(dims, chunk):
    inputs = [t.requires_grad_() for t in mix_inputs(*dims, seed=1)]
    assert torch.autograd.gradcheck(lambda *a: gspn_mix_reference(*a, chunk), inputs)


@pytest.mark.parametrize("dims,chunk", [((1, 2, 1, 3, 4), None), ((2, 4, 2, 4, 5), 2)])
def test_gradcheck_scan(dims, chunk):
    inputs = [t.requires_grad_() for t in scan_inputs(*dims, seed=2)]
    assert torch.autograd.gradcheck(lambda *a: gspn_scan_reference(*a, chunk), inputs)


# ---------------------------------------------------------------------------------------------
# Structure: cones, gates, chunks
# ---------------------------------------------------------------------------------------------

def _cone(d, i0, j0, h, w, chunk):
    """Pixels an impulse at (i0, j0) may reach in direction d: downstream, within +-1 per line."""
    cone = torch.zeros(h, w, dtype=torch.bool)
    for i in range(h):
        for j in range(w):
            steps, across, s0, s = {0: (j - j0, i - i0, j0, j), 1: (j0 - j, i - i0, j0, j),
                                    2: (i - i0, j - j0, i0, i), 3: (i0 - i, j - j0, i0, i)}[d]
            cone[i, j] = steps >= 0 and abs(across) <= steps and _same_block(s, s0, chunk)
    return cone


@pytest.mark.parametrize("chunk", [None, 3])
@pytest.mark.parametrize("d", [0, 1, 2, 3])
def test_impulse_reaches_exactly_its_downstream_cone(d, chunk):
    n, c, cg, h, w = 1, 4, 2, 7, 9
    _, logits, _, _ = mix_inputs(n, c, cg, h, w, seed=5)
    lam = torch.ones(n, 4, c, h, w, dtype=torch.float64)
    u = torch.zeros_like(lam)
    u[:, d] = 1  # read out direction d only
    for i0, j0 in [(3, 4), (0, 0), (6, 8), (2, 5)]:
        x = torch.zeros(n, c, h, w, dtype=torch.float64)
        x[0, 1, i0, j0] = 1
        y = gspn_mix_reference(x, logits, lam, u, chunk)
        assert torch.equal(y[0, 1] > 0, _cone(d, i0, j0, h, w, chunk)), (d, chunk, i0, j0)
        assert torch.count_nonzero(y[0, [0, 2, 3]]) == 0  # channels never mix


@pytest.mark.parametrize("height", [1, 2, 5])
def test_stability_gates_sum_to_one_and_boundaries_are_zero(height):
    logits = 3 * torch.randn(2, 3, 4, height, 6, dtype=torch.float64)
    g_up, g_mid, g_down = stability_gates(logits)
    torch.testing.assert_close(g_up + g_mid + g_down, torch.ones_like(g_mid), rtol=0, atol=1e-15)
    assert torch.all(g_up[..., 0, :] == 0) and torch.all(g_down[..., -1, :] == 0)
    if height == 1:
        assert torch.all(g_mid == 1)
    else:
        assert torch.all(g_up[..., 1:, :] > 0) and torch.all(g_down[..., :-1, :] > 0)


def test_stability_gates_keep_dtype_and_grad():
    logits = torch.randn(3, 2, 4, 5, dtype=torch.bfloat16, requires_grad=True)
    g = stability_gates(logits)
    assert all(t.dtype == torch.bfloat16 and t.shape == (2, 4, 5) for t in g)
    (g[0] * 2 + g[2]).sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad.float()).all()


def test_mix_gates_follow_each_directions_line_axis():
    """Huge logits on a nonexistent neighbour change nothing: the normalisation drops it per direction."""
    x, logits, lam, u = mix_inputs(1, 2, 2, 4, 5, seed=6)
    y = gspn_mix_reference(x, logits, lam, u)
    pushed = logits.clone()
    pushed[:, :2, 0, :, 0, :] = 50  # d = 0, 1: no neighbour at row -1
    pushed[:, :2, 2, :, -1, :] = -50  # ... none at row H
    pushed[:, 2:, 0, :, :, 0] = 50  # d = 2, 3: no neighbour at column -1
    pushed[:, 2:, 2, :, :, -1] = -50  # ... none at column W
    torch.testing.assert_close(gspn_mix_reference(x, pushed, lam, u), y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [2, 3])
def test_chunk_blocks_are_independent_scans(chunk):
    """With chunk = K, block b of the output is the global op run on block b alone."""
    n, c, cg, h, w = 2, 4, 2, 7, 8
    x, logits, lam, u = mix_inputs(n, c, cg, h, w, seed=7)
    for dirs, axis in (((0, 1), -1), ((2, 3), -2)):
        u_axis = torch.zeros_like(u)
        u_axis[:, list(dirs)] = u[:, list(dirs)]
        y = gspn_mix_reference(x, logits, lam, u_axis, chunk)
        size = x.shape[axis]
        for start in range(0, size, chunk):
            length = min(chunk, size - start)
            block = [t.narrow(axis, start, length) for t in (x, logits, lam, u_axis)]
            torch.testing.assert_close(y.narrow(axis, start, length), gspn_mix_reference(*block),
                                       rtol=1e-12, atol=1e-12)
    xs, lams, *gs = scan_inputs(n, c, cg, h, w, seed=8)
    hs = gspn_scan_reference(xs, lams, *gs, chunk)
    for start in range(0, w, chunk):
        length = min(chunk, w - start)
        block = [t.narrow(-1, start, length) for t in (xs, lams, *gs)]
        torch.testing.assert_close(hs.narrow(-1, start, length), gspn_scan_reference(*block),
                                   rtol=1e-12, atol=1e-12)


def test_chunk_one_is_pointwise_and_large_chunk_is_global():
    x, logits, lam, u = mix_inputs(1, 2, 1, 4, 5, seed=9)
    torch.testing.assert_close(gspn_mix_reference(x, logits, lam, u, 1), (lam * u).sum(1) * x)
    global_ = gspn_mix_reference(x, logits, lam, u)
    torch.testing.assert_close(gspn_mix_reference(x, logits, lam, u, 5), global_)


# ---------------------------------------------------------------------------------------------
# Low precision
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_rounds_only_at_the_end(dtype):
    """bf16/fp16 inputs: outputs and gradients in that dtype, within rounding of the exact answer.

    "Exact" is the float64 op on the SAME rounded inputs (and the same rounded dy), so the only error
    left is the oracle's own: fp32 arithmetic plus the final cast, i.e. at most half an ulp of each value
    (plus a 1e-5 floor of the tensor's scale for fp32 noise). Backends are then held to 2x this error.
    """
    inputs = mix_inputs(2, 8, 4, 6, 7, dtype=dtype, seed=10)
    dy = torch.randn(2, 8, 6, 7).to(dtype)
    ours = grads(gspn_mix_reference, inputs, dy, 3)
    exact = grads(gspn_mix_reference, [t.double() for t in inputs], dy.double(), 3)
    eps = torch.finfo(dtype).eps
    for name, a, e in zip(("y", "dx", "dlogits", "dlam", "du"), ours, exact):
        assert a.dtype == dtype, name
        err = (a.double() - e).abs()
        assert torch.all(err <= eps / 2 * e.abs() + 1e-5 * e.abs().max()), name


def test_float32_matches_float64():
    inputs = mix_inputs(2, 8, 2, 9, 6, seed=11)
    y64 = gspn_mix_reference(*inputs, None)
    y32 = gspn_mix_reference(*[t.float() for t in inputs], None)
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), y64, rtol=1e-5, atol=1e-5)
