"""Classifier-free guidance: all latent channels guided, sigma channels from the conditional half."""

import pytest
import torch

from gspn_gen.diffusion import GaussianDiffusion, cfg_model_fn

NULL = 10


class Recorder:
    """A fake model whose output depends on x, t and y; learned-sigma channels tell cond from null."""

    def __init__(self, extra_channels=True):
        self.extra_channels = extra_channels
        self.calls = []

    def __call__(self, x, t, y):
        self.calls.append((x.shape[0], y.clone()))
        scale = (y.float() + 1).view(-1, 1, 1, 1)
        eps = torch.sin(x) * scale + t.view(-1, 1, 1, 1) / 1000
        if not self.extra_channels:
            return eps
        sigma = (y == NULL).float().view(-1, 1, 1, 1).expand_as(x) * 5 - x
        return torch.cat([eps, sigma], dim=1)


def inputs(n=5, c=4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, 3, 3, generator=g)
    t = torch.linspace(0, 999, n)
    y = torch.arange(n) % 3
    return x, t, y


def test_scale_one_is_the_plain_model():
    model = Recorder()
    assert cfg_model_fn(model, 1.0, NULL) is model


@pytest.mark.parametrize("extra_channels", [True, False])
def test_guides_all_latent_channels_and_passes_sigma_from_cond(extra_channels):
    model = Recorder(extra_channels)
    x, t, y = inputs(c=4)                                  # 4 latent channels: all guided, not 3
    out = cfg_model_fn(model, 4.0, NULL)(x, t, y)
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, NULL))
    want = uncond[:, :4] + 4.0 * (cond[:, :4] - uncond[:, :4])
    torch.testing.assert_close(out[:, :4], want)
    if extra_channels:
        assert out.shape == (5, 8, 3, 3)
        torch.testing.assert_close(out[:, 4:], cond[:, 4:])
    else:
        assert out.shape == (5, 4, 3, 3)
    n_calls, y_seen = model.calls[0]
    assert n_calls == 10 and torch.equal(y_seen, torch.cat([y, torch.full_like(y, NULL)]))


def test_interval_limits_guidance_to_its_times():
    x, t, y = inputs(n=5)                                  # t / 1000 = 0, .25, .5, .75, ~1
    model = Recorder()
    out = cfg_model_fn(model, 3.0, NULL, interval=(0.2, 0.6))(x, t, y)
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, NULL))
    guided = uncond[:, :4] + 3.0 * (cond[:, :4] - uncond[:, :4])
    inside = torch.tensor([False, True, True, False, False])
    torch.testing.assert_close(out[inside, :4], guided[inside])
    torch.testing.assert_close(out[~inside, :4], cond[~inside, :4])
    torch.testing.assert_close(out[:, 4:], cond[:, 4:])


def test_interval_outside_skips_the_null_half():
    x, _, y = inputs(n=3)
    model = Recorder()
    fn = cfg_model_fn(model, 3.0, NULL, interval=(0.0, 0.5), time_scale=1.0)
    out = fn(x, torch.full((3,), 0.9), y)
    torch.testing.assert_close(out, model(x, torch.full((3,), 0.9), y))
    assert model.calls[0][0] == 3


def test_guided_sampling_runs_with_learned_sigma():
    model = Recorder()
    x, _, y = inputs(n=2)
    out = GaussianDiffusion().sample(cfg_model_fn(model, 2.0, NULL), x * 0.1, y, None, steps=3)
    assert out.shape == x.shape and torch.isfinite(out).all()


def official_dit_forward_with_cfg(model, x, t, y, cfg_scale):
    """facebookresearch/DiT's DiT.forward_with_cfg on a batch [x; x] with labels [y; null], written out:
    guidance on channels 0..2 only, every other channel (and the learned sigma) from each half itself."""
    half = x[: len(x) // 2]
    out = model(torch.cat([half, half]), t, y)
    eps, rest = out[:, :3], out[:, 3:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    return torch.cat([torch.cat([half_eps, half_eps]), rest], dim=1)


@pytest.mark.parametrize("extra_channels", [True, False])
def test_guide_channels_3_reproduces_official_dit_guidance(extra_channels):
    model = Recorder(extra_channels)
    x, t, y = inputs(c=4)
    official = official_dit_forward_with_cfg(
        model, torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, NULL)]), 1.5)[:5]
    ours = cfg_model_fn(model, 1.5, NULL, channels=3)(x, t, y)
    assert torch.equal(ours, official)
    assert not torch.equal(cfg_model_fn(model, 1.5, NULL)(x, t, y), official)  # the default guides all 4
