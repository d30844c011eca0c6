"""The oracle of the GSPN propagation (DESIGN.md §3): short and obviously right, not fast.

Each direction is turned into a left-to-right scan of (..., P, L) maps by a flip and/or transpose, scanned by
a plain Python loop over the L steps, and turned back; autograd gives the gradients. Arithmetic runs in
float64 for float64 inputs and in float32 otherwise (rounded to the input dtype once, at the end). Every
backend (`torch_backend`, `cupy_backend`) is tested against these functions.
"""

import torch
import torch.nn.functional as F

__all__ = ["gspn_mix_reference", "gspn_scan_reference", "stability_gates"]

# Direction d in the image frame <-> a left-to-right scan: lines along dim -2, steps along dim -1.
_TO_SCAN = (lambda t: t, lambda t: t.flip(-1), lambda t: t.transpose(-1, -2), lambda t: t.flip(-2).transpose(-1, -2))
_TO_IMAGE = (lambda t: t, lambda t: t.flip(-1), lambda t: t.transpose(-1, -2), lambda t: t.transpose(-1, -2).flip(-2))


def stability_gates(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GSPN's Stability-Context Condition: (..., 3, Cg, P, L) logits -> normalised (g_up, g_mid, g_down).

    g_k = sigmoid(a_k) / sum of sigmoid(a_k') over the neighbours k' that exist: none at offset -1 on line
    index 0, none at +1 on the last (P - 1). Gates come back in the logits' dtype, each (..., Cg, P, L).
    """
    if logits.dim() < 4 or logits.shape[-4] != 3:
        raise ValueError(f"logits must have shape (..., 3, Cg, P, L), got {tuple(logits.shape)}")
    s = torch.sigmoid(logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32))
    exists = torch.ones(3, 1, logits.shape[-2], 1, dtype=s.dtype, device=s.device)
    exists[0, :, 0] = 0
    exists[2, :, -1] = 0
    s = s * exists
    return tuple((s / s.sum(-4, keepdim=True)).to(logits.dtype).unbind(-4))


def _scan(a, g_up, g_mid, g_down, restart):
    """Left-to-right scan of a (N, C, P, L) with gates (N, Cg, P, L); step t starts fresh if restart(t)."""
    k = a.shape[1] // g_mid.shape[1]  # gate channel j serves channels j*k .. j*k+k-1
    g_up, g_mid, g_down = (g.repeat_interleave(k, 1) for g in (g_up, g_mid, g_down))
    h = torch.zeros_like(a[..., 0])
    out = []
    for t in range(a.shape[-1]):
        if restart(t):
            h = torch.zeros_like(h)
        up, down = F.pad(h[:, :, :-1], (1, 0)), F.pad(h[:, :, 1:], (0, 1))  # h[p - 1], h[p + 1], zero outside
        h = a[..., t] + g_up[..., t] * up + g_mid[..., t] * h + g_down[..., t] * down
        out.append(h)
    return torch.stack(out, -1)


def _restarts(length: int, reverse: bool, chunk: int | None):
    """restart(t) for scan step t: the first step, or the first step of a block [bK, bK + K) of image indices."""
    def restart(t: int) -> bool:
        i, prev = (length - 1 - t, length - t) if reverse else (t, t - 1)
        return t == 0 or (chunk is not None and i // chunk != prev // chunk)
    return restart


def _compute(*tensors):
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    return [t.to(dtype) for t in tensors]


def gspn_mix_reference(x, gate_logits, lam, u, chunk=None):
    """y = sum over d of u_d * scan_d(lam_d * x, stability_gates(gate_logits_d)), all in the image frame.

    x (N, C, H, W); gate_logits (N, 4, 3, Cg, H, W); lam, u (N, 4, C, H, W) -> y (N, C, H, W) in x's dtype.
    Directions d = 0 left->right, 1 right->left, 2 top->bottom, 3 bottom->top; chunk = K restarts every scan
    at the image-index blocks [0, K), [K, 2K), ... along its axis.
    """
    xc, logits, lam, u = _compute(x, gate_logits, lam, u)
    y = 0
    for d in range(4):
        a = _TO_SCAN[d](lam[:, d] * xc)
        gates = stability_gates(_TO_SCAN[d](logits[:, d]))
        h = _scan(a, *gates, _restarts(a.shape[-1], d in (1, 3), chunk))
        y = y + u[:, d] * _TO_IMAGE[d](h)
    return y.to(x.dtype)


def gspn_scan_reference(x, lam, g_up, g_mid, g_down, chunk=None):
    """One left->right scan with given gates: h[:, :, i, w] = lam*x + g_up*h[i-1, w-1] + g_mid*h[i, w-1]
    + g_down*h[i+1, w-1], zero outside the map; x, lam (N, C, H, W), gates (N, Cg, H, W) -> h in x's dtype."""
    xc, lam, g_up, g_mid, g_down = _compute(x, lam, g_up, g_mid, g_down)
    return _scan(lam * xc, g_up, g_mid, g_down, _restarts(x.shape[-1], False, chunk)).to(x.dtype)
