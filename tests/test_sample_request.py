"""SampleRequest: every sampling value is validated there, once, with one message; `sample` runs a request
without a command line (in memory here), and draws what sample.py draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gspn_gen.lit import GenerationModule
from gspn_gen.sampling.draw import generate
from gspn_gen.sampling.request import SampleRequest, SamplingError
from gspn_gen.sampling.run import sample

TINY = {"hidden_size": 32, "depth": 2, "num_heads": 2}


@pytest.fixture(scope="module")
def module():
    torch.manual_seed(0)
    return GenerationModule(model="GSPN-T/2", model_args=TINY, input_size=8).eval()


@pytest.mark.parametrize("fields, message", [
    ({"cfg_scale": float("nan")}, "--cfg-scale must be between 0 and 100 (1: no guidance, 0: unconditional), got nan"),
    ({"cfg_scale": -1.0}, "--cfg-scale must be between 0 and 100"),
    ({"cfg_scale": 1e30}, "--cfg-scale must be between 0 and 100"),
    ({"guidance_interval": (0.7, 0.2)}, "--guidance-interval LO HI needs 0 <= LO <= HI <= 1, got [0.7, 0.2]"),
    ({"steps": 0}, "--steps must be >= 1, got 0"),
    ({"batch_size": 0}, "--batch-size must be >= 1, got 0"),
    ({"out": "x.gif"}, "--out 'x.gif': expected a .png/.jpg/.jpeg (grid) or .npz (sample batch) path"),
    ({"out": "x.npz"}, "--out *.npz needs --num-samples N"),
    ({"device": "tpu"}, "--device 'tpu': expected cpu, cuda, cuda:N or auto"),
    ({"classes": ()}, "--classes: give at least one class id"),
])
def test_values_are_refused_when_the_request_is_made(fields, message):
    with pytest.raises(SamplingError) as exc:
        SampleRequest(**fields)
    assert message in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("fields, message", [
    ({"guide_channels": 0}, "--guide-channels 0: expected 1 to 1 (the model's latent channels)"),
    ({"guide_channels": 2}, "--guide-channels 2: expected 1 to 1 (the model's latent channels)"),
    ({"sampler": "heun"}, "--sampler 'heun': this checkpoint's gaussian process has ddim, ddpm"),
    ({"steps": 1001}, "--steps 1001: this checkpoint's gaussian process has 1000 timesteps"),
    ({"classes": (3, 10)}, "class id(s) [10] out of range: this checkpoint has classes 0..9"),
])
def test_values_the_model_decides_are_refused_when_the_request_meets_it(module, fields, message):
    with pytest.raises(SamplingError, match="^" + message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        sample(SampleRequest(num_samples=2, **fields), module=module, verbose=False)


def test_guidance_needs_a_null_class(module):
    unguidable = GenerationModule(model="GSPN-T/2", model_args={**TINY, "class_dropout_prob": 0.0}, input_size=8)
    with pytest.raises(SamplingError, match="no null class to guide with"):
        SampleRequest(cfg_scale=4.0).check(unguidable)
    SampleRequest(cfg_scale=1.0).check(unguidable)


def test_in_memory_samples_are_those_of_generate_whatever_the_batch_size(module):
    request = SampleRequest(num_samples=5, cfg_scale=2.0, steps=2, seed=3, batch_size=2, guide_channels=1)
    got = sample(request, module=module, verbose=False)
    assert got.labels.tolist() == [0, 1, 2, 3, 4] and got.images.shape == (5, 8, 8, 3)
    expected = generate(module, torch.arange(5), seed=3, cfg_scale=2.0, steps=2, guide_channels=1)
    np.testing.assert_array_equal(got.images, expected)
