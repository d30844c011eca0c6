"""Respacing: which steps are kept, and that the shorter process is the same process."""

import numpy as np
import pytest

from gspn_gen.diffusion import GaussianDiffusion, space_timesteps


def test_even_spacing_includes_both_ends():
    assert space_timesteps(1000, 5) == [0, 250, 500, 749, 999]
    assert space_timesteps(1000, "5") == space_timesteps(1000, 5)
    kept = space_timesteps(1000, 250)
    assert len(kept) == 250 and kept[0] == 0 and kept[-1] == 999
    assert space_timesteps(1000, 1000) == list(range(1000))
    assert space_timesteps(1000, 1) == [0]


def test_sections_and_ddim_striding():
    # 3 sections of 100 steps over T = 300: 2, 3 and 1 steps.
    assert space_timesteps(300, "2,3,1") == [0, 99, 100, 150, 199, 200]
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim3") == [0, 334, 668]


@pytest.mark.parametrize("spec", ["25", "ddim50", "10,20,5", 7])
def test_respaced_process_keeps_alphas_cumprod(spec):
    base = GaussianDiffusion(learn_sigma=False)
    spaced = base.respaced(spec)
    kept = space_timesteps(1000, spec)
    assert spaced.timestep_map.tolist() == kept and spaced.num_timesteps == len(kept)
    np.testing.assert_allclose(spaced.table("alphas_cumprod"), base.table("alphas_cumprod")[kept], rtol=1e-12)
    np.testing.assert_allclose(spaced.model_timesteps(spaced.timestep_map.new_tensor(range(len(kept)))),
                               kept)
    assert spaced.time_scale == 1000.0


def test_bad_specs():
    with pytest.raises(ValueError, match="cannot take"):
        space_timesteps(10, 11)
    with pytest.raises(ValueError, match="stride"):
        space_timesteps(1000, "ddim999")
    with pytest.raises(ValueError, match="ddimN"):
        space_timesteps(1000, "fifty")
