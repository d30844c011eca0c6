"""Flow matching against closed forms for Gaussian data x_0 ~ N(mu, s^2) per dimension.

With x_t = (1 - t) x_0 + t n, the marginal is N((1 - t) mu, V_t), V_t = (1 - t)^2 s^2 + t^2, the
exact velocity E[n - x_0 | x_t] is affine in x_t, and its ODE carries n at t = 1 to mu + s n at t = 0.
"""

import math

import pytest
import torch

from gspn_gen.diffusion import FlowMatching, PerSampleRNG, from_description

C, H, W = 8, 4, 4
MU = torch.linspace(-0.8, 0.8, C, dtype=torch.float64).view(C, 1, 1)
S = torch.linspace(0.2, 1.5, C, dtype=torch.float64).view(C, 1, 1)


def exact_velocity(x, t, y):
    """E[n - x_0 | x_t] for N(MU, S^2) data."""
    assert t.dtype == torch.float32 and t.shape == (x.shape[0],) and 0 <= t.min() and t.max() <= 1
    t = t.view(-1, 1, 1, 1).to(x)
    mu, s2 = MU.to(x), S.to(x) ** 2
    var = (1 - t) ** 2 * s2 + t**2
    return -mu + (t - (1 - t) * s2) * (x - (1 - t) * mu) / var


def per_channel(x):
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def test_surface():
    fm = from_description({"class_path": "gspn_gen.diffusion.FlowMatching"})
    assert isinstance(fm, FlowMatching)
    assert fm.learn_sigma is False and fm.time_scale == 1.0


def test_ode_samplers_transport_noise_to_data_and_heun_beats_euler():
    n = 64
    noise = PerSampleRNG(0, range(n)).randn((C, H, W)).double()
    y = torch.zeros(n, dtype=torch.long)
    want = MU + S * noise
    fm = FlowMatching()
    err = {}
    for sampler in ("euler", "heun"):
        for steps in (10, 40):
            out = fm.sample(exact_velocity, noise, y, None, sampler=sampler, steps=steps)
            err[sampler, steps] = (out - want).abs().max().item()
    assert err["heun", 10] < err["euler", 10] / 10
    assert err["heun", 40] < 2e-3
    assert err["euler", 40] < err["euler", 10] / 3        # first order: error ~ 1 / steps
    assert err["heun", 40] < err["heun", 10] / 10         # second order: error ~ 1 / steps^2


def test_sde_sampler_matches_data_distribution():
    fm = FlowMatching()
    outs = []
    for start in (0, 125):                                # per-sample seeds: batches add up
        rng = PerSampleRNG(1, range(start, start + 125))
        noise = rng.randn((C, H, W)).double()
        outs.append(fm.sample(exact_velocity, noise, torch.zeros(125, dtype=torch.long), rng,
                              sampler="sde", steps=100))
    out = per_channel(torch.cat(outs))                    # (C, 4000)
    m, s = out.shape[1], S.flatten()
    assert ((out.mean(1) - MU.flatten()) / (s / math.sqrt(m))).abs().max() < 4.5
    assert (out.std(1) / s - 1).abs().max() < 4.5 / math.sqrt(2 * m) + 0.01


def test_sde_sample_does_not_depend_on_batch_composition():
    fm = FlowMatching()
    full_rng = PerSampleRNG(3, range(6))
    full = fm.sample(exact_velocity, full_rng.randn((C, H, W)), torch.zeros(6, dtype=torch.long), full_rng,
                     sampler="sde", steps=10)
    part_rng = PerSampleRNG(3, [4, 1])
    part = fm.sample(exact_velocity, part_rng.randn((C, H, W)), torch.zeros(2, dtype=torch.long), part_rng,
                     sampler="sde", steps=10)
    torch.testing.assert_close(part, full[[4, 1]], rtol=1e-6, atol=1e-6)


def test_training_loss_of_exact_velocity_is_the_irreducible_error():
    """E||(n - x0) - E[n - x0 | x_t]||^2 = Var(n - x0 | x_t)
    = 1 + s^2 - (t - (1 - t) s^2)^2 / V_t; perturbed predictors do worse on the same draws."""
    n = 250
    g = torch.Generator().manual_seed(2)
    x0 = MU + S * torch.randn(n, C, H, W, generator=g, dtype=torch.float64)
    noise = torch.randn(n, C, H, W, generator=g, dtype=torch.float64)
    y = torch.zeros(n, dtype=torch.long)
    fm = FlowMatching()
    s2 = S**2
    for t_val in (0.1, 0.5, 0.9):
        t = torch.full((n,), t_val)
        losses = fm.training_losses(exact_velocity, x0, y, noise, t)
        assert set(losses) == {"loss", "mse"} and losses["loss"].shape == (n,)
        var_t = (1 - t_val) ** 2 * s2 + t_val**2
        want = (1 + s2 - (t_val - (1 - t_val) * s2) ** 2 / var_t).mean().item()
        assert losses["loss"].mean().item() == pytest.approx(want, rel=0.03)
        worse = fm.training_losses(lambda x, t, y: 1.1 * exact_velocity(x, t, y), x0, y, noise, t)
        assert worse["loss"].mean() > losses["loss"].mean()


def test_training_interpolant_and_target_convention():
    """The model sees x_t = (1 - t) x0 + t n at time t and is regressed onto n - x0."""
    x0, noise = torch.randn(3, 2, 2, 2), torch.randn(3, 2, 2, 2)
    t = torch.tensor([0.0, 0.25, 1.0])
    seen = {}

    def model(x, tt, y):
        seen["x"], seen["t"] = x, tt
        return noise - x0                                  # the per-sample target: zero loss

    losses = FlowMatching().training_losses(model, x0, None, noise, t)
    torch.testing.assert_close(seen["x"], (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise)
    torch.testing.assert_close(seen["t"], t)
    assert losses["loss"].abs().max() == 0


def test_sampler_time_grid_runs_from_noise_to_data():
    seen = []

    def model(x, t, y):
        seen.append(round(t[0].item(), 6))
        return torch.zeros_like(x)

    fm = FlowMatching()
    x = torch.randn(2, 1, 2, 2)
    fm.sample(model, x, None, None, sampler="euler", steps=4)
    assert seen == [1.0, 0.75, 0.5, 0.25]
    seen.clear()
    fm.sample(model, x, None, None, sampler="heun", steps=2)
    assert seen == [1.0, 0.5, 0.5, 0.0]


def test_errors_name_the_problem():
    fm = FlowMatching()
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="learn_sigma=False"):
        fm.training_losses(lambda x, t, y: torch.cat([x, x], 1), x, None)
    with pytest.raises(ValueError, match="rng"):
        fm.sample(lambda x, t, y: x, x, None, None, sampler="sde", steps=2)
    with pytest.raises(ValueError, match="'ddim'"):
        fm.sample(lambda x, t, y: x, x, None, None, sampler="ddim")
    with pytest.raises(ValueError, match="steps"):
        fm.sample(lambda x, t, y: x, x, None, None, steps=0)
