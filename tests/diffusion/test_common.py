"""What the processes share: their config form (describe / from_description, as checkpoints store it),
one way to respace, and the checked opening of training_losses."""

import numpy as np
import pytest
import torch

from gspn_gen.diffusion import FlowMatching, GaussianDiffusion, describe, from_description, space_timesteps
from gspn_gen.diffusion.common import loss_inputs


@pytest.mark.parametrize("process", [GaussianDiffusion(noise_schedule="cosine", learn_sigma=False, sampler="ddpm",
                                                       sampling_steps="ddim25"),
                                     FlowMatching(sampler="sde", sampling_steps=7, diffusion_norm=0.5)],
                         ids=["gaussian", "flow"])
def test_a_process_round_trips_through_its_plain_description(process):
    spec = describe(process)
    assert spec["class_path"].startswith("gspn_gen.diffusion.") and spec["init_args"] == process.config
    rebuilt = from_description(spec)
    assert type(rebuilt) is type(process) and rebuilt.config == process.config
    assert type(from_description({"class_path": type(process).__name__})) is type(process)


def test_only_our_processes_are_built_from_a_description():
    with pytest.raises(ValueError, match="unknown diffusion class_path 'os.system'"):
        from_description({"class_path": "os.system", "init_args": {"command": "true"}})
    with pytest.raises(ValueError, match="GaussianDiffusion"):
        from_description({"class_path": "GaussianDiffusion", "init_args": {"timestep_respacing": "25"}})


def test_sampling_respaces_the_training_process():
    process = GaussianDiffusion()
    short = process.respaced("ddim25")
    assert process.num_timesteps == 1000 and short.num_timesteps == 25
    assert short.timestep_map.tolist() == space_timesteps(1000, "ddim25")
    np.testing.assert_allclose(short.table("alphas_cumprod"),
                               process.table("alphas_cumprod")[short.timestep_map.numpy()], rtol=1e-12)


def test_loss_inputs_draw_what_is_missing_and_check_what_is_given():
    x0 = torch.zeros(3, 2, 4, 4)
    noise, t = loss_inputs(x0, None, None, lambda n: torch.arange(n))
    assert noise.shape == x0.shape and t.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="noise has shape"):
        loss_inputs(x0, torch.zeros(3, 2, 4), None, lambda n: torch.arange(n))
    with pytest.raises(ValueError, match=r"t has shape \(2,\), expected \(3,\)"):
        loss_inputs(x0, None, torch.zeros(2), lambda n: torch.arange(n))
