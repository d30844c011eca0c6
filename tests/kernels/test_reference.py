"""The PyTorch reference of the GSPN propagation (kernels/reference.py) against independent oracles.

Two oracles are written here from DESIGN.md §3 alone, sharing no code with the reference:
`naive_mix` / `naive_scan` (numpy float64, one Python loop step per pixel, each direction spelled
out with its own visiting order and neighbours) and `slow_mix` / `slow_scan` (differentiable torch,
each direction flipped/transposed into a left-to-right scan, autograd through a per-column loop).
"""

import numpy as np
import pytest
import torch
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
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen)
    logits = 2 * torch.randn(n, 4, 3, cg, h, w, generator=gen)
    lam = torch.randn(n, 4, c, h, w, generator=gen)
    u = torch.randn(n, 4, c, h, w, generator=gen)
    return [t.to(dtype) for t in (x, logits, lam, u)]


def scan_inputs(n, c, cg, h, w, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen)
    lam = torch.randn(n, c, h, w, generator=gen)
    gates = torch.rand(3, n, cg, h, w, generator=gen)  # any gates: gspn_scan takes them as given
    return [t.to(dtype) for t in (x, lam, *gates)]


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
# Oracle 2: differentiable, each direction turned into a left-to-right scan
# ---------------------------------------------------------------------------------------------

_TO = [lambda t: t, lambda t: t.flip(-1), lambda t: t.transpose(-1, -2),
       lambda t: t.flip(-2).transpose(-1, -2)]
_BACK = [lambda t: t, lambda t: t.flip(-1), lambda t: t.transpose(-1, -2),
         lambda t: t.transpose(-1, -2).flip(-2)]


def _slow_lr(a, g_up, g_mid, g_down, restart):
    """Left-to-right scan of a (N, C, P, L) with gates (N, Cg, P, L); restart(t): column t starts fresh."""
    k = a.shape[1] // g_mid.shape[1]
    g_up, g_mid, g_down = (g.repeat_interleave(k, 1) for g in (g_up, g_mid, g_down))
    prev = torch.zeros_like(a[..., 0])
    cols = []
    for t in range(a.shape[-1]):
        if t == 0 or restart(t):
            prev = torch.zeros_like(prev)
        up = torch.cat([torch.zeros_like(prev[:, :, :1]), prev[:, :, :-1]], 2)  # h[q - 1]
        down = torch.cat([prev[:, :, 1:], torch.zeros_like(prev[:, :, :1])], 2)  # h[q + 1]
        prev = a[..., t] + g_up[..., t] * up + g_mid[..., t] * prev + g_down[..., t] * down
        cols.append(prev)
    return torch.stack(cols, -1)


def _slow_gates(logits):
    """(N, 3, Cg, P, L) logits -> normalised gates over the neighbours that exist along P."""
    s = torch.sigmoid(logits)
    exists = torch.ones(3, 1, logits.shape[-2], 1, dtype=s.dtype)
    exists[0, :, 0] = 0
    exists[2, :, -1] = 0
    s = s * exists
    return (s / s.sum(1, keepdim=True)).unbind(1)


def slow_mix(x, logits, lam, u, chunk=None):
    y = 0
    for d in range(4):
        a = _TO[d](lam[:, d] * x)
        length = a.shape[-1]

        def restart(t, d=d, length=length):
            orig, prev = (t, t - 1) if d in (0, 2) else (length - 1 - t, length - t)
            return not _same_block(orig, prev, chunk)

        h = _slow_lr(a, *_slow_gates(_TO[d](logits[:, d])), restart)
        y = y + u[:, d] * _BACK[d](h)
    return y


def slow_scan(x, lam, g_up, g_mid, g_down, chunk=None):
    return _slow_lr(lam * x, g_up, g_mid, g_down, lambda t: not _same_block(t, t - 1, chunk))


# ---------------------------------------------------------------------------------------------
# Forward against the per-pixel oracle
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
def test_mix_matches_naive_oracle(shape):
    *dims, chunk = shape
    inputs = mix_inputs(*dims, seed=sum(dims))
    expected = naive_mix(*inputs, chunk)
    torch.testing.assert_close(gspn_mix_reference(*inputs, chunk), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(slow_mix(*inputs, chunk), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", SHAPES)
def test_scan_matches_naive_oracle(shape):
    *dims, chunk = shape
    inputs = scan_inputs(*dims, seed=sum(dims))
    expected = naive_scan(*inputs, chunk)
    torch.testing.assert_close(gspn_scan_reference(*inputs, chunk), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(slow_scan(*inputs, chunk), expected, rtol=1e-10, atol=1e-10)


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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(2, 4, 2, 5, 7, None), (1, 3, 1, 1, 6, 4), (2, 6, 3, 6, 6, 4),
                                   (1, 2, 2, 6, 1, 2), (2, 4, 1, 4, 5, 3)])
def test_mix_gradients_match_autograd(shape, dtype):
    *dims, chunk = shape
    inputs = mix_inputs(*dims, dtype=dtype, seed=3)
    dy = torch.randn(dims[0], dims[1], dims[3], dims[4], dtype=dtype)
    tol = {"rtol": 1e-9, "atol": 1e-9} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}
    expected_all = grads(slow_mix, inputs, dy, chunk)
    for ours, expected in zip(grads(gspn_mix_reference, inputs, dy, chunk), expected_all):
        torch.testing.assert_close(ours, expected, **tol)


@pytest.mark.parametrize("shape", [(2, 4, 2, 5, 7, None), (1, 3, 3, 1, 6, 4), (2, 6, 3, 6, 6, 4)])
def test_scan_gradients_match_autograd(shape):
    *dims, chunk = shape
    inputs = scan_inputs(*dims, seed=4)
    dy = torch.randn(dims[0], dims[1], dims[3], dims[4], dtype=torch.float64)
    expected_all = grads(slow_scan, inputs, dy, chunk)
    for ours, expected in zip(grads(gspn_scan_reference, inputs, dy, chunk), expected_all):
        torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-9)


def test_only_requested_gradients():
    """needs_input_grad: a subset of inputs requiring grad gets exactly those gradients."""
    x, logits, lam, u = mix_inputs(1, 2, 1, 3, 4)
    for wanted in range(4):
        leaves = [x, logits, lam, u]
        leaves[wanted] = leaves[wanted].clone().requires_grad_()
        gspn_mix_reference(*leaves).sum().backward()
        assert all((t.grad is not None) == (i == wanted) for i, t in enumerate(leaves))
        expected = torch.autograd.grad(slow_mix(*leaves).sum(), leaves[wanted])[0]
        torch.testing.assert_close(leaves[wanted].grad, expected, rtol=1e-9, atol=1e-9)


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

    "Exact" is the float64 op on the SAME rounded inputs (and the same rounded dy), so the only
    error left is ours: fp32 accumulation plus the final cast. It must be at most half an ulp of
    each value (plus a 1e-5 floor of the tensor's scale for fp32 noise), and at most 2x the error
    of a naive implementation that does every op in the low dtype (flash-attention's rule).
    """
    inputs = mix_inputs(2, 8, 4, 6, 7, dtype=dtype, seed=10)
    dy = torch.randn(2, 8, 6, 7).to(dtype)
    ours = grads(gspn_mix_reference, inputs, dy, 3)
    exact = grads(gspn_mix_reference, [t.double() for t in inputs], dy.double(), 3)
    naive = grads(slow_mix, inputs, dy, 3)
    eps = torch.finfo(dtype).eps
    for name, a, e, r in zip(("y", "dx", "dlogits", "dlam", "du"), ours, exact, naive):
        assert a.dtype == dtype, name
        err = (a.double() - e).abs()
        assert torch.all(err <= eps / 2 * e.abs() + 1e-5 * e.abs().max()), name
        assert err.max() <= 2 * (r.double() - e).abs().max(), name


def test_float32_matches_float64():
    inputs = mix_inputs(2, 8, 2, 9, 6, seed=11)
    y64 = gspn_mix_reference(*inputs, None)
    y32 = gspn_mix_reference(*[t.float() for t in inputs], None)
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), y64, rtol=1e-5, atol=1e-5)


def test_double_backward_is_refused():
    """The backward is a hand-written adjoint, not differentiable itself: asking for more raises
    instead of returning a silently wrong second derivative."""
    x, logits, lam, u = (t.requires_grad_() for t in mix_inputs(1, 2, 1, 3, 4))
    y = gspn_mix_reference(x, logits, lam, u)
    (dx,) = torch.autograd.grad(y, x, torch.randn_like(y).requires_grad_(), create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        dx.sum().backward()
