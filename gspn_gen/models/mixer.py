"""Token mixers: GSPN propagation (arXiv 2501.12381) and DiT's multi-head self-attention.

Both take tokens (N, T, D) with their grid (H, W), T = H * W in row-major order, and return (N, T, D),
so one block class holds either (DESIGN.md §4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from gspn_gen.kernels import gspn_mix


def tokens_to_map(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(N, T, C) row-major tokens -> contiguous (N, C, H, W) map."""
    n, _, c = x.shape
    return x.transpose(1, 2).reshape(n, c, *grid).contiguous()


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) map -> (N, T, C) row-major tokens."""
    return x.flatten(2).transpose(1, 2)


def layer_norm_in_dtype(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """`norm(x)` returned in x's dtype. Autocast runs layer_norm in fp32, which would turn a bf16 map
    into an fp32 copy and an fp32 output; the kernels accumulate in fp32 either way."""
    if x.dtype == torch.float32 or x.device.type == "meta" or not torch.is_autocast_enabled(x.device.type):
        return norm(x)
    with torch.autocast(x.device.type, enabled=False):
        return F.layer_norm(x, norm.normalized_shape, norm.weight.to(x.dtype), norm.bias.to(x.dtype), norm.eps)


@dataclass(frozen=True)
class AttentionConfig:
    """Settings of the attention mixer (DiT's)."""

    num_heads: int = 16                # SDPA heads; must divide the model width


@dataclass(frozen=True)
class GSPNConfig:
    """Settings of the GSPN mixers of a model: every layer's, and which layers scan globally."""

    chunk: int | None = 2              # local layers scan in blocks of `chunk` lines; None: all global
    global_layers: int = 2             # the last `global_layers` blocks (all if more) scan globally
    proxy_dim: int | None = None       # width the gates, lam and u are projected from; None: width // 16
    channels_per_gate: int = 1         # k: gate channel j serves channels j*k .. j*k+k-1 (GSPN-2 compact gates)
    conv_kernel: int = 3               # depthwise conv size (the official generator uses 7)
    direct_term: bool = False          # add x * D, D projected from the proxy (official d_conv)
    conv_out: bool = False             # official output path: 1x1 conv, depthwise 3x3, y * relu(y)
    scan_dim: int | None = None        # channels the propagation runs in (GSPN-2 compact); None: the width
    recompute: bool = False            # recompute everything between in_proj and out_proj in backward
    backend: Literal["auto", "cuda", "cuda-cluster", "cuda-portable", "cpu", "torch", "reference"] = "auto"   # gspn_mix backend


GSPN_DEFAULTS = GSPNConfig()


class AttentionMixer(nn.Module):
    """Multi-head self-attention in DiT's (timm's) layout: fused qkv with bias, output projection; SDPA."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must be >= 1 and divide the width dim={dim}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads)  # (N, T, 3, h, D/h)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                            # 3 x (N, h, T, D/h)
        x = F.scaled_dot_product_attention(q, k, v)                               # (N, h, T, D/h)
        x = x.transpose(1, 2).reshape(n, t, d)                                    # (N, T, D)
        return self.proj(x)                                                       # (N, T, D)


# GSPN mixer (paper §3, Fig. 3; DESIGN.md §3-4). A small "proxy" projection of the features feeds
# 1x1 projections that give, per pixel and per direction d, the three neighbour gate logits, the input
# weight lam_d and the output weight u_d of y = sum_d u_d * scan_d(lam_d * x). lam and u are plain linear
# outputs, as in the official code: the Stability-Context gates alone keep the scan bounded (each
# hidden state is a convex mix of the previous line plus lam * x), and the norm after the merge takes
# out the scale growth of long scans. Options reproduce the official generation block:
# `direct_term` adds x * D (its d_conv, Mamba's D skip; one D per direction, summed after the merge)
# and `conv_out` its output path (1x1 conv, depthwise 3x3, y * relu(y)) before the out-projection.
#
# Memory: the gates, lam and u maps are 20x the size of x (4 x 3 x Cg + 8 x C channels per pixel) but
# cost little to compute from the proxy, so with `recompute` everything between the two projections
# (conv, proxy, gates, lam, u, the scan, the norm, the official output path) runs again in backward
# instead of being kept: the mixer then keeps 3 token maps for backward where attention keeps 5.
# `scan_dim` (GSPN-2's compact propagation) runs all of that in fewer channels than the model width:
# in_proj projects down to scan_dim, out_proj lifts back.
class GSPNMixer(nn.Module):
    """GSPN token mixer: in-proj, depthwise conv, proxy -> (gates, lam, u), 4-direction scan, norm, out-proj."""

    def __init__(self, dim: int, config: GSPNConfig = GSPN_DEFAULTS, global_scan: bool = False):
        """`dim`: the model width; `config`: the layer's settings; `global_scan`: ignore config.chunk."""
        super().__init__()
        proxy_dim = max(dim // 16, 1) if config.proxy_dim is None else config.proxy_dim
        scan_dim = dim if config.scan_dim is None else config.scan_dim
        chunk = None if global_scan else config.chunk
        channels_per_gate, conv_kernel = config.channels_per_gate, config.conv_kernel
        if proxy_dim < 1:
            raise ValueError(f"proxy_dim={proxy_dim} must be >= 1")
        if scan_dim < 1:
            raise ValueError(f"scan_dim={scan_dim} must be >= 1")
        if channels_per_gate < 1 or scan_dim % channels_per_gate:
            raise ValueError(f"channels_per_gate={channels_per_gate} must be >= 1 and divide the scan width "
                             f"{scan_dim} (scan_dim, else the model width)")
        if chunk is not None and chunk < 1:
            raise ValueError(f"chunk={chunk} must be >= 1 or None (global propagation)")
        if conv_kernel < 1 or conv_kernel % 2 == 0:
            raise ValueError(f"conv_kernel={conv_kernel} must be odd and >= 1")
        self.dim = scan_dim                # channels of the propagated maps
        self.gate_channels = scan_dim // channels_per_gate
        self.chunk = chunk
        self.backend = config.backend
        self.recompute = config.recompute

        self.in_proj = nn.Linear(dim, scan_dim)
        self.conv = nn.Conv2d(scan_dim, scan_dim, conv_kernel, padding=conv_kernel // 2, groups=scan_dim)
        self.proxy = nn.Conv2d(scan_dim, proxy_dim, 1, bias=False)
        self.gate_proj = nn.Conv2d(proxy_dim, 4 * 3 * self.gate_channels, 1)
        self.lam_proj = nn.Conv2d(proxy_dim, 4 * scan_dim, 1)
        self.u_proj = nn.Conv2d(proxy_dim, 4 * scan_dim, 1)
        self.direct_proj = nn.Conv2d(proxy_dim, 4 * scan_dim, 1) if config.direct_term else None
        self.norm = nn.LayerNorm(scan_dim, eps=1e-6)
        self.conv_out = nn.Sequential(
            nn.Conv2d(scan_dim, scan_dim, 1, bias=False),
            nn.Conv2d(scan_dim, scan_dim, 3, padding=1, groups=scan_dim, bias=False),
        ) if config.conv_out else None
        self.out_proj = nn.Linear(scan_dim, dim)

    def extra_repr(self) -> str:
        return (f"chunk={self.chunk}, scan_dim={self.dim}, gate_channels={self.gate_channels}, "
                f"recompute={self.recompute}, backend={self.backend!r}")

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = self.in_proj(x)                                                       # (N, T, S)
        if self.recompute and torch.is_grad_enabled():
            # Non-reentrant checkpoint: only x is kept; the region is deterministic and draws no
            # random numbers, so no RNG state needs saving.
            y = checkpoint(self.propagate, x, grid, use_reentrant=False, preserve_rng_state=False)
        else:
            y = self.propagate(x, grid)
        return self.out_proj(y)                                                   # (N, T, D)

    def propagate(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Everything between the projections: (N, T, S) in-projected tokens -> (N, T, S) normed output."""
        h, w = grid
        n, c = x.shape[0], self.dim
        x = self.conv(tokens_to_map(x, grid))                                     # (N, S, H, W)
        p = self.proxy(x)                                                         # (N, P, H, W)
        gates = self.gate_proj(p).view(n, 4, 3, self.gate_channels, h, w)         # (N, 4, 3, Cg, H, W)
        lam = self.lam_proj(p).view(n, 4, c, h, w)                                # (N, 4, S, H, W)
        u = self.u_proj(p).view(n, 4, c, h, w)                                    # (N, 4, S, H, W)
        y = gspn_mix(x, gates, lam, u, chunk=self.chunk, backend=self.backend)    # (N, S, H, W)
        if self.direct_proj is not None:
            y = y + x * self.direct_proj(p).view(n, 4, c, h, w).sum(1)            # (N, S, H, W)
        y = layer_norm_in_dtype(self.norm, map_to_tokens(y))                      # (N, T, S)
        if self.conv_out is not None:
            y = self.conv_out(tokens_to_map(y, grid))                             # (N, S, H, W)
            y = map_to_tokens(y * F.relu(y))                                      # (N, T, S)
        return y

    def scan_flops(self, batch: int, grid: tuple[int, int]) -> int:
        """FLOPs of the gspn_mix call, by formula (matmuls elsewhere are counted by torch).

        Per direction and pixel: lam * x (1), three gated neighbours and their sum (6), u * h and the
        merge (2) on each of C channels; the gate normalisation (3 sigmoids, a sum of 3, 3 divides: 8)
        on each of Cg gate channels.
        """
        h, w = grid
        return 4 * batch * h * w * (9 * self.dim + 8 * self.gate_channels)
