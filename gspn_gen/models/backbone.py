"""DiT-style class-conditional diffusion backbone whose token mixer is GSPN or attention.

Call convention (DESIGN.md §4-5): model(x_t, t, y) -> (N, 2C or C, H, W). The model knows nothing of
the noise schedule. Two layouts share the embedders and the final layer:
- default: DiT's stack of adaLN-Zero blocks (Peebles & Xie 2023, §3.2), GSPN or attention as mixer;
- `paper_layout`: the official GSPN generator (U-ViT long skips, the condition added to the tokens
  once, pre-norm blocks without adaLN, adaLN only in the final layer), with our aligned 4-direction
  merge and truly global last layers. Also unlike the official code: the long skips fuse the residual
  stream (U-ViT) rather than the official code's pending block outputs; no extra LayerNorm before the
  final layer; no stochastic depth (official: drop_path 0.1); no learned per-direction merge weights
  (u_d carries them).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gspn_gen.models.mixer import GSPN_DEFAULTS, AttentionConfig, AttentionMixer, GSPNConfig, GSPNMixer


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (N, T, D) scaled and shifted per sample by (N, D) vectors."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """DiT's (MAE's) fixed 2D sin-cos embedding, (H * W, dim) row-major.

    The first dim/2 channels encode the column index, the last dim/2 the row index, each as
    [sin(pos * omega), cos(pos * omega)] with omega_i = 10000^(-i / (dim / 4)).
    """
    if dim % 4:
        raise ValueError(f"the sin-cos position embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))   # (D/4,)
    rows, cols = torch.meshgrid(
        torch.arange(grid[0], dtype=torch.float64), torch.arange(grid[1], dtype=torch.float64), indexing="ij"
    )

    def embed_1d(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega                                   # (H*W, D/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)                 # (H*W, D/2)

    return torch.cat([embed_1d(cols), embed_1d(rows)], dim=1).float()         # (H*W, D)


#################################################################################
#                     Embedding layers: patches, timesteps, labels              #
#################################################################################

class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens, as a strided conv (timm's PatchEmbed layout)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)                        # (N, T, D)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> vectors: sinusoidal features (GLIDE/DiT) then a 2-layer MLP.

    Accepts any real t: DDPM's integers 0..999 and flow matching's t in [0, 1] (as SiT feeds DiT's
    embedder) both give distinct features; the frequencies span periods 2*pi .. 2*pi*10^4.
    """

    def __init__(self, hidden_size: int, frequency_size: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.frequency_size = frequency_size
        self.max_period = max_period
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def frequencies(self, t: torch.Tensor) -> torch.Tensor:
        """(N,) -> (N, frequency_size): [cos(t * f_i), sin(t * f_i)], f_i = max_period^(-i / half)."""
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]                               # (N, half)
        emb = torch.cat([args.cos(), args.sin()], dim=-1)                     # (N, 2 * half)
        if self.frequency_size % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)      # (N, frequency_size)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.frequencies(t))                                  # (N, D)


class LabelEmbedder(nn.Module):
    """Class ids -> vectors. Row `num_classes` is the null class of classifier-free guidance; in
    training mode each label is replaced by it with probability `dropout_prob`."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        if not 0.0 <= dropout_prob <= 1.0:
            raise ValueError(f"class_dropout_prob must be in [0, 1], got {dropout_prob}")
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def drop(self, labels: torch.Tensor) -> torch.Tensor:
        """Labels with a random `dropout_prob` share replaced by the null id `num_classes`."""
        dropped = torch.rand(labels.shape, device=labels.device) < self.dropout_prob
        return torch.where(dropped, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            labels = self.drop(labels)
        return self.embedding_table(labels)                                   # (N, D)


#################################################################################
#                         Blocks and the final layer                            #
#################################################################################

class Mlp(nn.Module):
    """DiT's MLP: fc1, tanh-approximated GELU, fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Residual block around a mixer and an optional MLP (mlp_ratio=0: none).

    adaln=True (DiT): x + gate1 * Mixer(modulate(LN(x))), then x + gate2 * MLP(modulate(LN(x))), with
    shift/scale/gate regressed from the condition (adaLN-Zero). adaln=False (paper layout): plain
    pre-norm x + Mixer(LN(x)) with affine LNs; `skip` fuses a U-ViT long skip first: Linear([x, skip]).
    """

    def __init__(self, hidden_size: int, mixer: nn.Module, mlp_ratio: float, adaln: bool, skip: bool):
        super().__init__()
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.skip_linear = nn.Linear(2 * hidden_size, hidden_size) if skip else None
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=not adaln, eps=1e-6)
        self.mixer = mixer
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=not adaln, eps=1e-6) if mlp_hidden else None
        self.mlp = Mlp(hidden_size, mlp_hidden) if mlp_hidden else None
        # adaLN-Zero: shift, scale and gate for the mixer, and for the MLP when there is one
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), nn.Linear(hidden_size, (6 if mlp_hidden else 3) * hidden_size)
        ) if adaln else None

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, grid: tuple[int, int], skip: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))                    # (N, T, D)
        if self.adaLN_modulation is None:
            x = x + self.mixer(self.norm1(x), grid)                               # (N, T, D)
            if self.mlp is not None:
                x = x + self.mlp(self.norm2(x))                                   # (N, T, D)
            return x
        # DiT's names; "msa" is the mixer (DiT's multi-head self-attention), GSPN or attention here.
        if self.mlp is None:
            shift_msa, scale_msa, gate_msa = self.adaLN_modulation(c).chunk(3, dim=1)        # 3 x (N, D)
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
                self.adaLN_modulation(c).chunk(6, dim=1))                                   # 6 x (N, D)
        x = x + gate_msa.unsqueeze(1) * self.mixer(modulate(self.norm1(x), shift_msa, scale_msa), grid)
        if self.mlp is not None:
            x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x                                                                  # (N, T, D)


class FinalLayer(nn.Module):
    """DiT's final layer: LN, adaLN shift/scale from the condition, linear to patch pixels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)                   # 2 x (N, D)
        return self.linear(modulate(self.norm_final(x), shift, scale))            # (N, T, p*p*C_out)


#################################################################################
#                                 The backbone                                  #
#################################################################################

class DiffusionBackbone(nn.Module):
    """Class-conditional diffusion backbone: patchify, blocks of GSPN or attention, unpatchify."""

    def __init__(
        self,
        input_size: int = 32,                       # side of x_t the model is built for (latent or pixels)
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,                            # number of blocks
        mlp_ratio: float = 4.0,                     # MLP width / hidden_size; 0: no MLP
        class_dropout_prob: float = 0.1,            # training-time share of labels replaced by the null id
        num_classes: int = 1000,                    # the null class id is num_classes
        learn_sigma: bool = True,                   # output 2 * in_channels (eps and the sigma interpolant)
        mixer: GSPNConfig | AttentionConfig = GSPN_DEFAULTS,  # the token mixer and its settings
        paper_layout: bool = False,                 # official GSPN generator layout (module docstring)
        fixed_pos_embed: bool | None = None,        # DiT's sin-cos position embedding; None: attention only
    ):
        super().__init__()
        if not isinstance(mixer, (GSPNConfig, AttentionConfig)):
            raise TypeError(f"mixer must be a GSPNConfig or an AttentionConfig, got {mixer!r}")
        if input_size % patch_size:
            raise ValueError(f"input_size={input_size} must be a multiple of patch_size={patch_size}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if isinstance(mixer, GSPNConfig) and mixer.global_layers < 0:
            raise ValueError(f"global_layers must be >= 0, got {mixer.global_layers}")
        if mlp_ratio < 0:
            raise ValueError(f"mlp_ratio must be >= 0, got {mlp_ratio}")
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.paper_layout = paper_layout
        grid = (input_size // patch_size, input_size // patch_size)

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # DiT's fixed sin-cos embedding (by default for attention only; a GSPN model converted from a
        # DiT keeps it), a frozen parameter as in DiT (so the parameter count and state-dict key match);
        # other grids get theirs computed on the fly.
        if fixed_pos_embed is None:
            fixed_pos_embed = isinstance(mixer, AttentionConfig)
        self.pos_embed = nn.Parameter(
            torch.zeros(1, grid[0] * grid[1], hidden_size), requires_grad=False
        ) if fixed_pos_embed else None
        self.grid = grid

        def make_mixer(i: int) -> nn.Module:
            if isinstance(mixer, AttentionConfig):
                return AttentionMixer(hidden_size, mixer.num_heads)
            return GSPNMixer(hidden_size, mixer, global_scan=i >= depth - mixer.global_layers)

        # Paper layout: the first (depth - 1) // 2 blocks feed long skips into the last ones, block
        # depth - 1 - i taking block i's output (U-ViT); odd depth leaves one middle block.
        self.num_skips = (depth - 1) // 2 if paper_layout else 0
        self.blocks = nn.ModuleList([
            Block(hidden_size, make_mixer(i), mlp_ratio, adaln=not paper_layout,
                  skip=i >= depth - self.num_skips)
            for i in range(depth)
        ])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation; adaLN-Zero makes the untrained model output exactly zero."""
        # Linear layers: Xavier-uniform weights, zero biases (convs in the mixer keep PyTorch's default).
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        # Fixed sin-cos position embedding (attention, or GSPN with fixed_pos_embed).
        if self.pos_embed is not None:
            self.pos_embed.data.copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1], self.grid).unsqueeze(0))

        # Patch embedding initialised like a linear layer over the flattened patch.
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)

        # Label table and timestep MLP: N(0, 0.02).
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero: every block starts as the identity.
        for block in self.blocks:
            if block.adaLN_modulation is not None:
                nn.init.zeros_(block.adaLN_modulation[-1].weight)
                nn.init.zeros_(block.adaLN_modulation[-1].bias)

        # Zero output layer: the untrained model predicts exactly zero.
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def compile_blocks(self, **compile_args) -> None:
        """torch.compile each block in place (regional compilation): blocks of one structure share a
        compiled graph, so compiling takes the same time at any depth; parameter names do not change."""
        for block in self.blocks:
            block.compile(**compile_args)

    def position_embedding(self, grid: tuple[int, int], ref: torch.Tensor) -> torch.Tensor:
        """(1, T, D) sin-cos embedding for `grid`: the stored one, or computed for another grid."""
        if grid == self.grid:
            return self.pos_embed
        return sincos_pos_embed_2d(self.pos_embed.shape[-1], grid).to(ref).unsqueeze(0)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(N, T, p*p*C_out) -> (N, C_out, H*p, W*p)."""
        (h, w), p, c = grid, self.patch_size, self.out_channels
        x = x.reshape(x.shape[0], h, w, p, p, c)                                  # (N, h, w, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x)                                     # (N, C, h, p, w, p)
        return x.reshape(x.shape[0], c, h * p, w * p)                             # (N, C, H, W)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) noisy input; t: (N,) timesteps (any real scale); y: (N,) int64 class ids
        (num_classes = null). Returns (N, 2C, H, W) when learn_sigma, else (N, C, H, W)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        p = self.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"x spatial size {tuple(x.shape[-2:])} must be a multiple of patch_size={p}")
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        if t.ndim == 0:
            t = t.expand(x.shape[0])                                              # (N,)
        x = self.x_embedder(x)                                                    # (N, T, D), T = H*W/p^2
        if self.pos_embed is not None:
            x = x + self.position_embedding(grid, x)                              # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y)                               # (N, D)
        if self.paper_layout:
            x = x + c.unsqueeze(1)                                                # (N, T, D)
        skips = []
        for i, block in enumerate(self.blocks):
            x = block(x, c, grid, skips.pop() if block.skip_linear is not None else None)  # (N, T, D)
            if i < self.num_skips:
                skips.append(x)
        x = self.final_layer(x, c)                                                # (N, T, p*p*C_out)
        return self.unpatchify(x, grid)                                           # (N, C_out, H, W)
