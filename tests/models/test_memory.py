"""The memory model (gspn_gen.models.memory): its counts against hand counts, and the budget it pins.

The budget: a GSPN-XL/2 block keeps no more for backward than a DiT-XL/2 block, and its mixer no more
than attention (SDPA), chunked and global layers alike, at 256 and 512 px. Checked on stand-ins of
width 256 (16 heads) at the XL/2 token grids: every saved map scales with the width, so the ratios are
those of the real widths (benchmarks/memory.py measures those).
"""

import pytest
import torch
from torch import nn

from gspn_gen.models import build_model
from gspn_gen.models.backbone import Block
from gspn_gen.models.memory import block_inputs, measure_block

WIDTH = 256


def stand_in(name: str, index: int, **overrides):
    torch.manual_seed(0)
    model = build_model(name, hidden_size=WIDTH, depth=2, num_heads=16, **overrides)
    return model.blocks[index].train()


def measure(block, grid, batch=1, dtype=None):
    x, c, skip = block_inputs(block, batch, grid, WIDTH)
    return measure_block(block, x, c, grid, skip, autocast_dtype=dtype, backward=False)


@pytest.mark.parametrize("grid", [(16, 16), (32, 32)])  # 256 and 512 px: SD-VAE latents, patch 2
def test_gspn_block_and_mixer_keep_no_more_than_dit(grid):
    dit = measure(stand_in("DiT-XL/2", 0), grid)
    for index in (0, 1):  # chunked, then global
        gspn = measure(stand_in("GSPN-XL/2", index), grid)
        assert gspn.saved["mixer"] <= 1.0 * dit.saved["mixer"], (index, gspn.saved, dit.saved)
        assert gspn.saved_total <= dit.saved_total, (index, gspn.saved, dit.saved)


def test_bf16_autocast_keeps_the_budget_and_counts_weight_casts_apart():
    grid = (16, 16)
    dit = measure(stand_in("DiT-XL/2", 0), grid, dtype=torch.bfloat16)
    gspn = measure(stand_in("GSPN-XL/2", 1), grid, dtype=torch.bfloat16)
    assert gspn.saved["mixer"] <= dit.saved["mixer"] and gspn.saved_total <= dit.saved_total
    assert dit.weight_casts > 0 and gspn.weight_casts > 0  # autocast's bf16 weight copies
    # the forward writes bf16 activations (the weight copies are not counted): less than in fp32
    assert sum(dit.written.values()) < sum(measure(stand_in("DiT-XL/2", 0), grid).written.values())


def test_counts_match_hand_counts():
    grid, tokens, batch = (8, 8), 64, 2
    token_map = batch * tokens * WIDTH * 4  # one fp32 (N, T, D) map
    # attention keeps its input, q, k and v (one qkv storage), its output and a logsumexp per head
    dit = measure(stand_in("DiT-XL/2", 0), grid, batch)
    assert dit.saved["mixer"] == 5 * token_map + batch * 16 * tokens * 4
    # the recomputing GSPN mixer: in_proj's input, the checkpoint's input, out_proj's input
    gspn = measure(stand_in("GSPN-XL/2", 0), grid, batch)
    assert gspn.saved["mixer"] == 3 * token_map
    assert gspn.saved["mlp"] == dit.saved["mlp"] and gspn.saved["other"] == dit.saved["other"]
    # without recomputation the maps of gates (12 C), lam and u (4 C each) are kept too
    full = measure(stand_in("GSPN-XL/2", 0, recompute=False), grid, batch)
    assert full.saved["mixer"] > (3 + 20) * token_map
    assert gspn.written == full.written and gspn.flops_forward == full.flops_forward


class _Stash(torch.autograd.Function):
    """Keeps a tensor as a plain context attribute instead of through save_for_backward."""

    @staticmethod
    def forward(ctx, x):
        ctx.kept = x * 2
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.kept


class _StashMixer(nn.Module):
    def forward(self, x, grid):
        return _Stash.apply(x)


def test_context_attributes_count_as_saved():
    block = Block(WIDTH, _StashMixer(), mlp_ratio=0, adaln=True, skip=False)
    m = measure(block, (4, 4), batch=2)
    assert m.saved["mixer"] == 2 * 16 * WIDTH * 4
