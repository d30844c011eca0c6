"""bf16 autocast (what the GPU configs train with) runs the whole step: gspn_mix gets one dtype."""

from __future__ import annotations

import pytest
import torch

from gspn_gen.lit import GenerationModule


@pytest.mark.parametrize("preset, args", [("GSPN-T/2", {}), ("DiT-T/2", {}),
                                          ("GSPN-paper-B/2", {"depth": 3, "hidden_size": 96})])
def test_training_step_under_bf16_autocast(preset, args):
    torch.manual_seed(0)
    module = GenerationModule(model=preset, model_args=args, num_classes=10, in_channels=4, input_size=8)
    x, y = torch.randn(4, 4, 8, 8), torch.randint(0, 10, (4,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module.diffusion.training_losses(module.model, x, y)["loss"].mean()
    loss.backward()
    assert torch.isfinite(loss)
    missing = [n for n, p in module.model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing[:3]}"
