"""Pure-PyTorch backend of the GSPN propagation: the CPU training path (any device, any float dtype).

Same contract as the oracle (`reference.py`), against which it is tested, but fast: speed on CPU comes from
the memory layout. Every map is converted once into the *line layout* (k, H, W, N, Cg): x channel
c = j * k + kk (gate channel j, kk < k) sits at [kk, ..., j], so a gate (1, H, W, N, Cg) broadcasts over the
outermost axis and every elementwise op runs over contiguous runs of N * Cg numbers. The conversion is one
blocked 2D transpose of (N * Cg, k * H * W) (torch's fast copy path; general permutes are 5-10x slower on CPU).
Direction-stacked tensors put the direction first: (4, k, H, W, N, Cg).

All four directions share ONE Python loop over the scan position t. Direction d works on column (d = 0, 1)
or row (d = 2, 3) p = t, or p = L - 1 - t when reversed; its line axis (H for d = 0, 1; W for d = 2, 3) is
never flipped, so gate k = 0, 1, 2 is the neighbour at line index q - 1, q, q + 1 on the previous line.

Backward recomputes the hidden states (nothing is kept between forward and backward but the op's inputs,
as with the CUDA kernels) and runs the adjoint scan, a reverse loop with the transposed tridiagonal
transition; normalised gates are recomputed from the logits. Arithmetic is fp32 (fp64 for fp64 inputs);
results come back in the input dtype.

Functions (inputs valid and contiguous; `ops.py` checks them): mix_forward, mix_backward, scan_forward,
scan_backward.
"""

import torch

__all__ = ["mix_backward", "mix_forward", "scan_backward", "scan_forward"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Layout conversion: image (..., N, C, H, W) <-> lines (..., k, H, W, N, Cg)
# ---------------------------------------------------------------------------------------------

def _dense(t: torch.Tensor, dtype: torch.dtype, fresh: bool = False) -> torch.Tensor:
    """t as a contiguous tensor of `dtype` (a new one if `fresh`), in one pass (permute and cast)."""
    if t.is_contiguous() and t.dtype == dtype and not fresh:
        return t
    return torch.empty(t.shape, dtype=dtype, device=t.device).copy_(t)


def _to_lines(t: torch.Tensor, cg: int, dtype: torch.dtype) -> torch.Tensor:
    """(..., N, C, H, W) -> contiguous (..., k, H, W, N, Cg) of `dtype`, k = C // cg."""
    *lead, n, c, h, w = t.shape
    k = c // cg
    src = _dense(t, dtype).view(-1, n * cg, k * h * w)
    out = torch.empty(*lead, k, h, w, n, cg, dtype=dtype, device=t.device)
    flat = out.view(-1, k * h * w, n * cg)
    for b in range(src.shape[0]):
        flat[b].copy_(src[b].t())
    return out


def _from_lines(t: torch.Tensor) -> torch.Tensor:
    """Inverse of `_to_lines` (same dtype): (..., k, H, W, N, Cg) -> contiguous (..., N, C, H, W)."""
    *lead, k, h, w, n, cg = t.shape
    src = t.reshape(-1, k * h * w, n * cg)
    out = torch.empty(*lead, n, cg * k, h, w, dtype=t.dtype, device=t.device)
    flat = out.view(-1, n * cg, k * h * w)
    for b in range(src.shape[0]):
        flat[b].copy_(src[b].t())
    return out


# ---------------------------------------------------------------------------------------------
# Gates: the Stability-Context Condition, all four directions at once
# ---------------------------------------------------------------------------------------------

def _image_gates(gate_logits: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised gates and zeroed sigmoids, both (3, 4, N, Cg, H, W), from (N, 4, 3, Cg, H, W).

    g_k = sigmoid(a_k) / sum of sigmoid(a_k') over the neighbours k' that exist (none at offset -1 on line
    index 0, none at +1 on the last); the line axis is H for d = 0, 1 and W for d = 2, 3.
    """
    logits = gate_logits.permute(2, 1, 0, 3, 4, 5)
    sig = torch.empty(logits.shape, dtype=dtype, device=logits.device)
    torch.sigmoid(logits.to(dtype), out=sig)  # permute and sigmoid in one pass (fp32 inputs)
    sig[0, :2, :, :, 0].zero_()
    sig[2, :2, :, :, -1].zero_()
    sig[0, 2:, :, :, :, 0].zero_()
    sig[2, 2:, :, :, :, -1].zero_()
    return sig / sig.sum(0, keepdim=True), sig


# ---------------------------------------------------------------------------------------------
# The scan and its adjoint, in place on line-layout tensors
# ---------------------------------------------------------------------------------------------

class _Direction:
    """Where direction d scans in a per-direction line-layout tensor (k, H, W, N, Cg)."""

    def __init__(self, d: int, height: int, width: int, chunk: int | None):
        self.scan_dim = 2 if d < 2 else 1  # W for left/right, H for top/bottom
        self.line_dim = 1 if d < 2 else 2
        self.reverse = d in (1, 3)
        self.length = width if d < 2 else height
        # keep[t]: the t-th position visited continues from the previous one. Blocks are
        # [0, K), [K, 2K), ... in image coordinates for both orders, so a reversed scan restarts
        # at image index p with (p + 1) % K == 0, i.e. at t with (L - t) % K == 0.
        length = self.length
        self.keep = [t > 0 and (chunk is None or ((length - t) if self.reverse else t) % chunk != 0)
                     for t in range(length)]
        # positions that have a previous line in scan order but restart: K, 2K, ... (forward)
        # or K-1, 2K-1, ... below L-1 (reversed); as a slice, so no index tensor is needed
        self.restarts = None if chunk is None else (
            slice(chunk - 1, length - 1, chunk) if self.reverse else slice(chunk, length, chunk))

    def position(self, t: int) -> tuple[int, int]:
        """(position visited at step t, its predecessor)."""
        if self.reverse:
            p = self.length - 1 - t
            return p, p + 1
        return t, t - 1


def _scan_(h: torch.Tensor, gates: torch.Tensor, dirs: list[_Direction]) -> None:
    """h[s] = a[s] + g_0[s] * h[s-1, q-1] + g_1[s] * h[s-1, q] + g_2[s] * h[s-1, q+1], in place.

    h: (D, k, H, W, N, Cg) holding a = lam * x on entry and the states on exit;
    gates: (3, D, 1, H, W, N, Cg); dirs[i] describes slot i. One loop over t for all directions.
    """
    for t in range(1, max(d.length for d in dirs)):
        for i, d in enumerate(dirs):
            if t >= d.length or not d.keep[t]:
                continue
            p, pp = d.position(t)
            cur, prev = h[i].select(d.scan_dim, p), h[i].select(d.scan_dim, pp)  # (k, P, N, Cg)
            g = gates[:, i].select(d.scan_dim + 1, p)  # (3, 1, P, N, Cg)
            cur.addcmul_(g[1], prev)
            cur[:, 1:].addcmul_(g[0, :, 1:], prev[:, :-1])
            cur[:, :-1].addcmul_(g[2, :, :-1], prev[:, 1:])


def _adjoint_(adj: torch.Tensor, gates: torch.Tensor, dirs: list[_Direction]) -> None:
    """Adjoint of `_scan_`, in place: dL/dh from the output on entry, total dL/dh (= dL/da) on exit.

    adj[s-1] += M[s]^T adj[s] with (M^T v)[q] = g_1[q] v[q] + g_0[q+1] v[q+1] + g_2[q-1] v[q-1]
    (gates of step s), visiting the steps in reverse order.
    """
    for t in range(max(d.length for d in dirs) - 1, 0, -1):
        for i, d in enumerate(dirs):
            if t >= d.length or not d.keep[t]:
                continue
            p, pp = d.position(t)
            nxt, cur = adj[i].select(d.scan_dim, p), adj[i].select(d.scan_dim, pp)
            g = gates[:, i].select(d.scan_dim + 1, p)
            cur.addcmul_(g[1], nxt)
            cur[:, :-1].addcmul_(g[0, :, 1:], nxt[:, 1:])
            cur[:, 1:].addcmul_(g[2, :, :-1], nxt[:, :-1])


def _gate_grads(adj: torch.Tensor, h: torch.Tensor, dirs: list[_Direction]) -> torch.Tensor:
    """dL/d(gates) (3, D, 1, H, W, N, Cg) from the adjoint and the states, both (D, k, H, W, N, Cg).

    dL/dg_j[s, q] = sum over the k channels a gate serves of adj[s, q] * h[s-1, q + j - 1].
    """
    num, k, height, width, n, cg = h.shape
    dg = h.new_zeros(3, num, 1, height, width, n, cg)
    for i, d in enumerate(dirs):
        length, lines = d.length, (height if d.line_dim == 1 else width)
        if length == 1:
            continue
        # positions with a predecessor, and the predecessors, along the scan axis
        a_pos, h_pos = (0, 1) if d.reverse else (1, 0)
        adj_s = adj[i].narrow(d.scan_dim, a_pos, length - 1)
        h_s = h[i].narrow(d.scan_dim, h_pos, length - 1)
        dg_s = dg[:, i].narrow(d.scan_dim + 1, a_pos, length - 1)  # (3, 1, ...)
        line = d.line_dim
        for kk in range(k):
            a_k, h_k = adj_s[kk:kk + 1], h_s[kk:kk + 1]
            dg_s[1].addcmul_(a_k, h_k)
            if lines > 1:
                dg_s[0].narrow(line, 1, lines - 1).addcmul_(
                    a_k.narrow(line, 1, lines - 1), h_k.narrow(line, 0, lines - 1))
                dg_s[2].narrow(line, 0, lines - 1).addcmul_(
                    a_k.narrow(line, 0, lines - 1), h_k.narrow(line, 1, lines - 1))
        if d.restarts is not None:
            index = [slice(None)] * dg[:, i].dim()
            index[d.scan_dim + 1] = d.restarts
            dg[:, i][tuple(index)] = 0
    return dg


# ---------------------------------------------------------------------------------------------
# Four directions: gspn_mix
# ---------------------------------------------------------------------------------------------

_ALL = (0, 1, 2, 3)


def _mix_states(x, gates_lines, lam, dirs, cg, cd):
    """Hidden states of the four directions in the line layout (4, k, H, W, N, Cg)."""
    a = _dense(lam.transpose(0, 1), cd, fresh=True).mul_(x)  # lam_d * x, (4, N, C, H, W)
    h = _to_lines(a, cg, cd)
    del a
    _scan_(h, gates_lines, dirs)
    return h


def mix_forward(x, gate_logits, lam, u, chunk):
    """y (N, C, H, W) in x's dtype; nothing is kept for backward."""
    height, width = x.shape[-2:]
    cg, cd = gate_logits.shape[3], _compute_dtype(x.dtype)
    dirs = [_Direction(d, height, width, chunk) for d in _ALL]
    gates = _to_lines(_image_gates(gate_logits, cd)[0], cg, cd)
    h_img = _from_lines(_mix_states(x, gates, lam, dirs, cg, cd))  # (4, N, C, H, W)
    y = torch.mul(h_img[0], u[:, 0])
    for d in _ALL[1:]:
        y.addcmul_(h_img[d], u[:, d])
    return y.to(x.dtype)


def mix_backward(dy, x, gate_logits, lam, u, chunk, needs):
    """(dx, d gate_logits, dlam, du), each None unless `needs` asks for it; hidden states recomputed."""
    need_x, need_logits, need_lam, need_u = needs
    height, width = x.shape[-2:]
    cg, cd = gate_logits.shape[3], _compute_dtype(x.dtype)
    dirs = [_Direction(d, height, width, chunk) for d in _ALL]
    dy = dy.to(cd)
    g_img, sig = _image_gates(gate_logits, cd)  # (3, 4, N, Cg, H, W)
    gates = _to_lines(g_img, cg, cd)
    dx = dlogits = dlam = du = None

    h = _mix_states(x, gates, lam, dirs, cg, cd) if need_u or need_logits else None
    if need_u:
        du = torch.empty(u.shape, dtype=cd, device=u.device)
        torch.mul(_from_lines(h).transpose(0, 1), dy.unsqueeze(1), out=du)
        du = du.to(u.dtype)
    if need_x or need_logits or need_lam:
        adj = _dense(u.transpose(0, 1), cd, fresh=True).mul_(dy)  # dL/dh = u_d * dy, (4, N, C, H, W)
        adj = _to_lines(adj, cg, cd)  # (4, k, H, W, N, Cg)
        _adjoint_(adj, gates, dirs)  # now dL/d(lam_d * x)
        if need_x or need_lam:
            a_img = _from_lines(adj)  # (4, N, C, H, W)
            if need_x:
                dx = torch.mul(a_img[0], lam[:, 0])
                for d in _ALL[1:]:
                    dx.addcmul_(a_img[d], lam[:, d])
                dx = dx.to(x.dtype)
            if need_lam:
                dlam = torch.empty(lam.shape, dtype=cd, device=lam.device)
                torch.mul(a_img.transpose(0, 1), x.unsqueeze(1), out=dlam)
                dlam = dlam.to(lam.dtype)
        if need_logits:
            dg = _from_lines(_gate_grads(adj, h, dirs))  # (3, 4, N, Cg, H, W)
            # g_j = s_j / sum_k s_k with s_j = sigmoid(a_j), or 0 if neighbour j does not exist:
            # dL/da_j = g_j * (1 - sigmoid(a_j)) * (dg_j - sum_k dg_k g_k)
            dg -= torch.mul(dg, g_img).sum(0, keepdim=True)
            dg *= g_img
            dg *= sig.neg_().add_(1)
            dlogits = torch.empty(gate_logits.shape, dtype=gate_logits.dtype, device=dg.device)
            dlogits.copy_(dg.permute(2, 1, 0, 3, 4, 5))
    return dx, dlogits, dlam, du


# ---------------------------------------------------------------------------------------------
# One direction with given gates: gspn_scan
# ---------------------------------------------------------------------------------------------

def _scan_states(x, lam, gates_lines, dirs, cg, cd):
    h = _to_lines(lam, cg, cd).mul_(_to_lines(x, cg, cd)).unsqueeze(0)  # (1, k, H, W, N, Cg)
    _scan_(h, gates_lines, dirs)
    return h


def _scan_gates(g_up, g_mid, g_down, cg, cd):
    return _to_lines(torch.stack((g_up, g_mid, g_down)).unsqueeze(1), cg, cd)  # (3, 1, 1, H, W, N, Cg)


def scan_forward(x, lam, g_up, g_mid, g_down, chunk):
    """h (N, C, H, W) in x's dtype."""
    height, width = x.shape[-2:]
    cg, cd = g_mid.shape[1], _compute_dtype(x.dtype)
    dirs = [_Direction(0, height, width, chunk)]
    h = _scan_states(x, lam, _scan_gates(g_up, g_mid, g_down, cg, cd), dirs, cg, cd)
    return _from_lines(h[0]).to(x.dtype)


def scan_backward(dh, x, lam, g_up, g_mid, g_down, chunk, needs):
    """(dx, dlam, dg_up, dg_mid, dg_down), each None unless `needs` asks for it."""
    need_x, need_lam, *need_g = needs
    height, width = x.shape[-2:]
    cg, cd = g_mid.shape[1], _compute_dtype(x.dtype)
    dirs = [_Direction(0, height, width, chunk)]
    gates = _scan_gates(g_up, g_mid, g_down, cg, cd)
    adj = _to_lines(dh, cg, cd).unsqueeze(0)  # dL/dh, (1, k, H, W, N, Cg)
    _adjoint_(adj, gates, dirs)
    a_img = _from_lines(adj[0])  # dL/d(lam * x), (N, C, H, W)
    dx = (a_img * lam).to(x.dtype) if need_x else None
    dlam = (a_img * x).to(lam.dtype) if need_lam else None
    dgs = [None, None, None]
    if any(need_g):
        h = _scan_states(x, lam, gates, dirs, cg, cd)
        dg = _from_lines(_gate_grads(adj, h, dirs))[:, 0]  # (3, N, Cg, H, W)
        dgs = [dg[j].to(g_mid.dtype, copy=True) if need else None for j, need in enumerate(need_g)]  # no aliases
    return dx, dlam, *dgs
