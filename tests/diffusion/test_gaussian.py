"""Gaussian diffusion against closed forms for Gaussian data.

For data x_0 ~ N(mu, s^2) per dimension, E[eps | x_t] is affine in x_t, so the exact eps predictor is
known; each sampler step is then affine too, and the sampler's output distribution follows from a
recursion written here from the papers' formulas (independently of gaussian.py's tables).
"""

import math

import numpy as np
import pytest
import scipy.stats
import torch

from gspn_gen.diffusion import GaussianDiffusion, PerSampleRNG, from_description

T = 1000
BETAS = np.linspace(1e-4, 0.02, T)            # Ho et al.'s linear schedule
ABAR = np.cumprod(1.0 - BETAS)
C, H, W = 8, 4, 4                             # channel c has its own (mu_c, s_c); H*W iid copies
MU = torch.linspace(-0.8, 0.8, C, dtype=torch.float64).view(C, 1, 1)
S = torch.linspace(0.2, 1.5, C, dtype=torch.float64).view(C, 1, 1)


def exact_model(v=None):
    """model(x, t, y) returning E[eps | x_t] for N(MU, S^2) data (+ C channels of v if given)."""
    abar = torch.from_numpy(ABAR)

    def model(x, t, y):
        assert t.dtype == torch.float32 and torch.all(t == t.round())
        a = abar[t.long().cpu()].view(-1, 1, 1, 1).to(x)
        eps = torch.sqrt(1 - a) * (x - torch.sqrt(a) * MU.to(x)) / (a * S.to(x) ** 2 + 1 - a)
        if v is None:
            return eps
        return torch.cat([eps, torch.as_tensor(v, dtype=x.dtype, device=x.device).expand_as(eps)], dim=1)

    return model


def chain(kept, sampler, v=None):
    """Per-channel (A, B, V) with output = A * x_T + B + (Gaussian noise of variance V).

    Steps over the kept original timesteps, with the exact eps predictor, DDPM posterior means and
    variances (Ho et al. eqs. 6-7; IDDPM eq. 15 for learned v) or DDIM eta=0 (Song et al. eq. 12).
    """
    mu, s = MU.flatten().numpy(), S.flatten().numpy()
    a_acc, b_acc, v_acc = np.ones(C), np.zeros(C), np.zeros(C)
    abars = ABAR[kept]
    for k in range(len(kept) - 1, -1, -1):
        ab = abars[k]
        ab_prev = abars[k - 1] if k > 0 else 1.0
        c = math.sqrt(1 - ab) / (ab * s**2 + 1 - ab)                  # eps = c (x - sqrt(ab) mu)
        p, q = (1 - math.sqrt(1 - ab) * c) / math.sqrt(ab), math.sqrt(1 - ab) * c * mu  # x0 = p x + q
        if sampler == "ddim":
            a = math.sqrt(ab_prev) * p + math.sqrt(1 - ab_prev) * c
            b = math.sqrt(ab_prev) * q - math.sqrt(1 - ab_prev) * c * math.sqrt(ab) * mu
            var = 0.0
        else:
            beta = 1 - ab / ab_prev
            coef1 = math.sqrt(ab_prev) * beta / (1 - ab)
            coef2 = math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)
            a, b = coef1 * p + coef2, coef1 * q
            beta_tilde = beta * (1 - ab_prev) / (1 - ab)
            if k == 0:
                var = 0.0
            elif v is None:
                var = beta_tilde
            else:
                frac = (v + 1) / 2
                var = math.exp(frac * math.log(beta) + (1 - frac) * math.log(beta_tilde))
        a_acc, b_acc, v_acc = a * a_acc, a * b_acc + b, a**2 * v_acc + var
    return a_acc, b_acc, v_acc


def sample_in_batches(d, model, n, seed, batch, **kwargs):
    """Samples 0..n-1 drawn `batch` at a time (per-sample seeds make this equal to one big batch);
    small batches also keep tensors under torch's intra-op parallel grain on a busy machine."""
    outs = []
    for start in range(0, n, batch):
        rng = PerSampleRNG(seed, range(start, min(start + batch, n)))
        noise = rng.randn((C, H, W)).double()
        outs.append(d.sample(model, noise, torch.zeros(len(rng), dtype=torch.long), rng, **kwargs))
    return torch.cat(outs)


def per_channel(x):
    """(N, C, H, W) -> (C, N*H*W)."""
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def test_schedule_is_dits_linear():
    d = GaussianDiffusion()
    np.testing.assert_allclose(d.table("betas"), BETAS, rtol=1e-12)
    np.testing.assert_allclose(d.table("alphas_cumprod"), ABAR, rtol=1e-12)
    assert d.time_scale == 1000.0 and d.num_timesteps == 1000 and d.learn_sigma
    cos = GaussianDiffusion(noise_schedule="cosine").table("alphas_cumprod")
    s = np.arange(1, T + 1) / T                            # IDDPM eq. 17, f(t) / f(0)
    want = np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2 / math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    np.testing.assert_allclose(cos[:-1], want[:-1], rtol=1e-9)   # the last beta is capped at 0.999


def test_posterior_matches_bayes_rule():
    """q(x_{t-1} | x_t, x_0) from the tables equals Gaussian conditioning done directly."""
    g = torch.Generator().manual_seed(0)
    for d in (GaussianDiffusion(), GaussianDiffusion().respaced("ddim25")):
        ab = ABAR[d.timestep_map.numpy()]
        for i in (1, 2, d.num_timesteps // 2, d.num_timesteps - 1):
            x0 = torch.randn(5, 3, 2, 2, generator=g, dtype=torch.float64)
            xt = torch.randn(5, 3, 2, 2, generator=g, dtype=torch.float64)
            t = torch.full((5,), i)
            mean, var, logvar = d.q_posterior(x0, xt, t)
            # x_{t-1} ~ N(sqrt(ab_prev) x0, 1 - ab_prev); x_t | x_{t-1} ~ N(sqrt(alpha) x_{t-1}, beta).
            alpha = ab[i] / ab[i - 1]
            prec = 1 / (1 - ab[i - 1]) + alpha / (1 - alpha)
            want_mean = (math.sqrt(ab[i - 1]) * x0 / (1 - ab[i - 1]) + math.sqrt(alpha) * xt / (1 - alpha)) / prec
            torch.testing.assert_close(mean, want_mean, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(var.expand_as(x0), torch.full_like(x0, 1 / prec), rtol=1e-10, atol=0)
            torch.testing.assert_close(logvar.expand_as(x0), torch.full_like(x0, -math.log(prec)))


def test_ddim_matches_closed_form_and_converges_to_data():
    """DDIM (eta=0) is a deterministic affine map for Gaussian data: it equals the closed-form chain
    exactly at 50 steps, and at 1000 steps it maps noise n to ~ mu + s n (the PF-ODE solution)."""
    n = 64
    noise = PerSampleRNG(1, range(n)).randn((C, H, W)).double()
    y = torch.zeros(n, dtype=torch.long)
    d = GaussianDiffusion(learn_sigma=False)
    for steps in (50, 1000):
        out = d.sample(exact_model(), noise, y, None, sampler="ddim", steps=steps)
        a, b, _ = chain(list(d._process_for(steps).timestep_map.numpy()), "ddim")
        want = torch.from_numpy(a).view(C, 1, 1) * noise + torch.from_numpy(b).view(C, 1, 1)
        torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-9)
    assert (out - (MU + S * noise)).abs().max() < 0.03


@pytest.mark.parametrize("learn_sigma, v", [(False, None), (True, 0.3)])
def test_ddpm_matches_closed_form_distribution(learn_sigma, v):
    """DDPM samples have the mean/std the closed-form chain predicts (tight, 50 steps), and that
    chain's output tends to N(mu, s^2) as the steps go to 1000."""
    d = GaussianDiffusion(learn_sigma=learn_sigma)
    out = sample_in_batches(d, exact_model(v), 1000, 2, 125, sampler="ddpm", steps=50)
    out = per_channel(out)                               # (C, 16000)
    a, b, var = chain(list(d._process_for(50).timestep_map.numpy()), "ddpm", v)
    want_mean, want_std = torch.from_numpy(b), torch.from_numpy(np.sqrt(a**2 + var))
    m = out.shape[1]
    assert ((out.mean(1) - want_mean) / (want_std / math.sqrt(m))).abs().max() < 4.5
    assert ((out.std(1) / want_std - 1) * math.sqrt(2 * m)).abs().max() < 4.5
    a, b, var = chain(list(range(T)), "ddpm", v)
    np.testing.assert_allclose(b, MU.flatten().numpy(), atol=0.01)
    np.testing.assert_allclose(np.sqrt(a**2 + var), S.flatten().numpy(), rtol=0.02)


def test_ddpm_full_chain_samples_data_distribution():
    """1000-step DDPM with the exact model (learned-range v = 0) gives mean mu and std s."""
    out = sample_in_batches(GaussianDiffusion(), exact_model(0.0), 128, 3, 128, sampler="ddpm", steps=1000)
    out = per_channel(out)                               # (C, 2048)
    m = out.shape[1]
    s = S.flatten()
    assert ((out.mean(1) - MU.flatten()) / (s / math.sqrt(m))).abs().max() < 4.5
    assert (out.std(1) / s - 1).abs().max() < 4.5 / math.sqrt(2 * m) + 0.01   # + the 1000-step bias


def test_ddpm_sample_does_not_depend_on_batch_composition():
    d = GaussianDiffusion()
    model = exact_model(0.5)
    full_rng = PerSampleRNG(7, range(8))
    full = d.sample(model, full_rng.randn((C, H, W)), torch.zeros(8, dtype=torch.long), full_rng,
                    sampler="ddpm", steps=20)
    part_rng = PerSampleRNG(7, [5, 2])
    part = d.sample(model, part_rng.randn((C, H, W)), torch.zeros(2, dtype=torch.long), part_rng,
                    sampler="ddpm", steps=20)
    torch.testing.assert_close(part, full[[5, 2]], rtol=1e-6, atol=1e-6)


def test_training_mse_of_exact_model_is_the_irreducible_error():
    """E||eps - E[eps|x_t]||^2 = Var(eps | x_t) = ab s^2 / (ab s^2 + 1 - ab): nothing is learnable
    beyond it, and perturbed predictors do worse on the same draws."""
    n = 250
    g = torch.Generator().manual_seed(4)
    x0 = MU + S * torch.randn(n, C, H, W, generator=g, dtype=torch.float64)
    noise = torch.randn(n, C, H, W, generator=g, dtype=torch.float64)
    y = torch.zeros(n, dtype=torch.long)
    d = GaussianDiffusion(learn_sigma=False)
    exact = exact_model()
    for i in (10, 300, 900):
        t = torch.full((n,), i)
        losses = d.training_losses(exact, x0, y, noise, t)
        assert set(losses) == {"loss", "mse"} and losses["loss"].shape == (n,)
        ab = ABAR[i]
        want = (ab * S**2 / (ab * S**2 + 1 - ab)).mean().item()
        assert losses["loss"].mean().item() == pytest.approx(want, rel=0.03)
        for worse in (lambda x, t, y: 1.1 * exact(x, t, y), lambda x, t, y: exact(x, t, y) + 0.05):
            assert d.training_losses(worse, x0, y, noise, t)["loss"].mean() > losses["loss"].mean()


def test_vlb_term_is_minimised_at_the_optimal_variance():
    """With the exact mean, E[KL] as a function of the variance is minimised at
    Sigma* = beta~ + coef1^2 Var(x0 | x_t), where it equals 0.5 log(Sigma* / beta~) nats."""
    n = 250
    g = torch.Generator().manual_seed(5)
    x0 = MU + S * torch.randn(n, C, H, W, generator=g, dtype=torch.float64)
    noise = torch.randn(n, C, H, W, generator=g, dtype=torch.float64)
    y = torch.zeros(n, dtype=torch.long)
    d = GaussianDiffusion(learn_sigma=True)
    s2 = S.flatten().numpy() ** 2
    for i in (10, 100, 500):
        ab, ab_prev, beta = ABAR[i], ABAR[i - 1], BETAS[i]
        beta_tilde = beta * (1 - ab_prev) / (1 - ab)
        coef1 = beta * math.sqrt(ab_prev) / (1 - ab)
        sigma_star = beta_tilde + coef1**2 * s2 * (1 - ab) / (ab * s2 + 1 - ab)
        v_star = 2 * np.log(sigma_star / beta_tilde) / math.log(beta / beta_tilde) - 1
        v_star = torch.from_numpy(v_star).view(C, 1, 1)
        t = torch.full((n,), i)
        losses = d.training_losses(exact_model(v_star), x0, y, noise, t)
        assert set(losses) == {"loss", "mse", "vb"}
        want_bits = (0.5 * np.log(sigma_star / beta_tilde)).mean() / math.log(2)
        assert losses["vb"].mean().item() == pytest.approx(want_bits, rel=0.03)
        for dv in (-0.2, 0.2):
            assert d.training_losses(exact_model(v_star + dv), x0, y, noise, t)["vb"].mean() > \
                losses["vb"].mean()
        torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])


def test_vlb_at_t0_is_the_decoder_nll():
    """At t = 0 the VLB term is -log of the N(mean, sigma^2) mass of x0's 8-bit bin, in bits/dim."""
    n = 6
    g = torch.Generator().manual_seed(6)
    x0 = (torch.rand(n, 2, 3, 3, generator=g, dtype=torch.float64) * 1.8 - 0.9)
    x0[0, 0, 0, 0], x0[1, 0, 0, 0] = -1.0, 1.0                      # the two open-ended end bins
    noise = torch.randn(n, 2, 3, 3, generator=g, dtype=torch.float64)
    eps_hat = noise + 0.3 * torch.randn(n, 2, 3, 3, generator=g, dtype=torch.float64)
    v = torch.rand(n, 2, 3, 3, generator=g, dtype=torch.float64) * 2 - 1
    d = GaussianDiffusion(learn_sigma=True)
    t = torch.zeros(n, dtype=torch.long)
    vb = d.training_losses(lambda x, t, y: torch.cat([eps_hat, v], 1), x0, None, noise, t)["vb"]
    assert vb.shape == (n,) and torch.isfinite(vb).all() and (vb > 0).all()
    # Independent computation with scipy: model mean and variance at t = 0.
    ab0 = ABAR[0]
    xt = (math.sqrt(ab0) * x0 + math.sqrt(1 - ab0) * noise).numpy()
    mean = (xt - math.sqrt(1 - ab0) * eps_hat.numpy()) / math.sqrt(ab0)     # x0 pred; coef1 = 1 at t = 0
    beta_tilde_1 = BETAS[1] * (1 - ABAR[0]) / (1 - ABAR[1])
    frac = (v.numpy() + 1) / 2
    std = np.exp(0.5 * (frac * math.log(BETAS[0]) + (1 - frac) * math.log(beta_tilde_1)))
    x = x0.numpy()
    upper = np.where(x > 0.999, 1.0, scipy.stats.norm.cdf((x + 1 / 255 - mean) / std))
    lower = np.where(x < -0.999, 0.0, scipy.stats.norm.cdf((x - 1 / 255 - mean) / std))
    want = -np.log(np.maximum(upper - lower, 1e-12)).reshape(n, -1).mean(1) / math.log(2)
    np.testing.assert_allclose(vb.numpy(), want, rtol=1e-6)


def test_vlb_trains_only_the_variance_channels():
    d = GaussianDiffusion(learn_sigma=True)
    x0 = torch.randn(4, 2, 3, 3)
    out = torch.randn(4, 4, 3, 3, requires_grad=True)
    losses = d.training_losses(lambda x, t, y: out, x0, None, t=torch.tensor([0, 5, 500, 999]))
    (grad_vb,) = torch.autograd.grad(losses["vb"].sum(), out, retain_graph=True)
    (grad_mse,) = torch.autograd.grad(losses["mse"].sum(), out)
    assert grad_vb[:, :2].abs().max() == 0 and grad_vb[:, 2:].abs().max() > 0
    assert grad_mse[:, 2:].abs().max() == 0 and grad_mse[:, :2].abs().max() > 0


def test_respaced_sampling_calls_model_with_original_timesteps_and_caches():
    d = GaussianDiffusion(learn_sigma=False)
    seen = []

    def model(x, t, y):
        seen.append(t[0].item())
        return torch.zeros_like(x)

    d.sample(model, torch.randn(2, 1, 2, 2), torch.zeros(2, dtype=torch.long), None, steps=5)
    assert seen == [999.0, 749.0, 500.0, 250.0, 0.0]
    assert d._process_for(5) is d._process_for(5) is d.respaced("5")
    assert d._process_for(1000) is d
    seen.clear()
    d.sample(model, torch.randn(2, 1, 2, 2), torch.zeros(2, dtype=torch.long), None, steps="ddim4")
    assert seen == [750.0, 500.0, 250.0, 0.0]


def test_clip_denoised_keeps_pixel_samples_in_range():
    model = exact_model()
    noise = PerSampleRNG(8, range(16)).randn((C, H, W)).double()
    y = torch.zeros(16, dtype=torch.long)
    free = GaussianDiffusion(learn_sigma=False).sample(model, noise, y, None, steps=10)
    clipped = GaussianDiffusion(learn_sigma=False, clip_denoised=True).sample(model, noise, y, None, steps=10)
    assert free.abs().max() > 1.5
    assert clipped.abs().max() <= 1.0


def test_ddim_eta_draws_from_rng_and_progress_bar_runs(capsys):
    d = GaussianDiffusion(learn_sigma=False)
    noise = PerSampleRNG(10, range(3)).randn((C, H, W))
    y = torch.zeros(3, dtype=torch.long)
    a = d.sample(exact_model(), noise, y, PerSampleRNG(9, range(3)), steps=4, eta=1.0, progress=True)
    b = d.sample(exact_model(), noise, y, PerSampleRNG(9, range(3)), steps=4, eta=1.0)
    c = d.sample(exact_model(), noise, y, None, steps=4, eta=0.0)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    assert "ddim 4 steps" in capsys.readouterr().err


def test_errors_name_the_problem():
    d = GaussianDiffusion(learn_sigma=True)
    x = torch.randn(2, 3, 4, 4)
    y = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="6 channels"):
        d.training_losses(lambda x, t, y: x, x, y)
    with pytest.raises(ValueError, match="rng"):
        d.sample(lambda x, t, y: torch.cat([x, x], 1), x, y, None, sampler="ddpm", steps=2)
    with pytest.raises(ValueError, match="'euler'"):
        d.sample(lambda x, t, y: x, x, y, None, sampler="euler")
    with pytest.raises(ValueError, match="noise_schedule"):
        GaussianDiffusion(noise_schedule="quadratic")
    with pytest.raises(ValueError, match="'bogus'"):
        from_description({"class_path": "bogus"})
    process = from_description({"class_path": "GaussianDiffusion", "init_args": {"learn_sigma": False}})
    assert isinstance(process, GaussianDiffusion) and not process.learn_sigma


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sampling_matches_cpu():
    """Same seeds, same samples on either device (noise is drawn on the CPU, then moved)."""
    d = GaussianDiffusion()
    outs = []
    for device in ("cpu", "cuda"):
        rng = PerSampleRNG(11, range(4), device=device)
        noise = rng.randn((C, H, W))
        model = exact_model(0.2)
        outs.append(d.sample(model, noise, torch.zeros(4, dtype=torch.long, device=device), rng,
                             sampler="ddpm", steps=10).cpu())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
