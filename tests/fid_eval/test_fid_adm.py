"""ADM's evaluation protocol: sFID, ADM reference batches, IS over splits of 5,000, statistics without a network."""

import json

import numpy as np
import pytest
import scipy.linalg
import torch

from fid_eval import evaluate
from fid_eval.__main__ import main
from fid_eval.errors import FidEvalError
from fid_eval.features import Extractor
from fid_eval.inception import SPATIAL_DIM, spatial_features
from fid_eval.inputs import ArraySource
from fid_eval.metrics import MomentAccumulator, frechet_distance, inception_score, precision_recall
from fid_eval.stats import Stats, compute_stats, save_stats


class TinyInception(Extractor):
    """Stand-in with Inception's name and the shape of its outputs at toy widths: 12-d pool, 8-d spatial."""

    name, fingerprint, weights_path, feature_dim, num_classes, spatial_dim = (
        "inception", "inception-v3-compat-0000000000000000", "-", 12, 6, 8)

    def __init__(self):
        super().__init__(torch.device("cpu"))

    def _forward(self, images):
        x = torch.nn.functional.adaptive_avg_pool2d(images.float() / 255, 2)  # (B, 3, 2, 2)
        pool = x.flatten(1)                                                    # (B, 12)
        return pool, pool[:, :6] * 5, x[:, :2].flatten(1)                      # logits (B, 6), spatial (B, 8)


def _images(n, seed, size=8):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# ADM's evaluator, re-implemented with NumPy/SciPy from its published formulas (evaluations/evaluator.py):
def _adm_spatial(conv_nchw):
    """`spatial[..., :7]` of the NHWC mixed_6/conv tensor, reshaped to (N, -1)."""
    nhwc = np.transpose(conv_nchw, (0, 2, 3, 1))
    return nhwc[..., :7].reshape(len(nhwc), -1)


def _adm_frechet(mu1, sigma1, mu2, sigma2, eps=1e-6):
    diff = mu1 - mu2
    covmean, _ = scipy.linalg.sqrtm(sigma1.dot(sigma2), disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real)


def _adm_inception_score(logits, split_size=5000):
    preds = np.exp(logits - logits.max(axis=1, keepdims=True))
    preds /= preds.sum(axis=1, keepdims=True)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i:i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def test_spatial_features_are_adm_nhwc_first_seven_channels():
    conv = torch.randn(2, 192, 17, 17)
    ours = spatial_features(conv).numpy()
    assert ours.shape == (2, SPATIAL_DIM) == (2, 2023)
    assert np.array_equal(ours, _adm_spatial(conv.numpy()))
    assert ours[1, (4 * 17 + 9) * 7 + 5] == conv[1, 5, 4, 9]  # index (h * W + w) * 7 + c


def test_sfid_equals_adm_formula_on_synthetic_spatial_features():
    rng = np.random.default_rng(0)
    # Two sets of mixed_6/conv-like maps (N, 192, 5, 5) with different means and correlations: 175-d features.
    a = torch.from_numpy(rng.gamma(2.0, 1.0, (400, 192, 5, 5)))
    b = torch.from_numpy(rng.gamma(2.0, 1.0, (300, 192, 5, 5)) * 1.2 + 0.3 * rng.standard_normal((300, 1, 5, 5)))
    stats = []
    for maps in (a, b):
        acc = MomentAccumulator()
        for part in maps.split(64):  # batch by batch, as compute_stats feeds it
            acc.update(spatial_features(part).numpy())
        stats.append(acc.result())
    ours = frechet_distance(*stats[0], *stats[1])
    fa, fb = _adm_spatial(a.numpy()), _adm_spatial(b.numpy())
    adm = _adm_frechet(fa.mean(0), np.cov(fa, rowvar=False), fb.mean(0), np.cov(fb, rowvar=False))
    assert ours == pytest.approx(adm, rel=1e-7)


def test_moment_accumulator_equals_numpy_mean_and_cov():
    x = np.random.default_rng(1).standard_normal((57, 6)) * 0.01 + 1e4  # a large offset must not cancel
    acc = MomentAccumulator()
    for part in (x[:1], x[1:20], x[20:]):
        acc.update(part)
    mu, sigma = acc.result()
    assert np.allclose(mu, x.mean(0), rtol=0, atol=1e-9)
    assert np.allclose(sigma, np.cov(x, rowvar=False), rtol=1e-7, atol=0)


def test_adm_reference_batch_with_mu_sigma_mu_s_sigma_s_and_arr_0(tmp_path):
    rng = np.random.default_rng(0)
    mu, mu_s = rng.standard_normal(12), rng.standard_normal(8)
    a, b = rng.standard_normal((12, 12)), rng.standard_normal((8, 8))
    sigma, sigma_s = a @ a.T, b @ b.T
    np.savez(tmp_path / "VIRTUAL_ref.npz", arr_0=_images(30, 1), mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    ext = TinyInception()
    report = evaluate(ArraySource(_images(40, 2)), str(tmp_path / "VIRTUAL_ref.npz"), "fid,sfid,isc", ext,
                      cache_dir=tmp_path / "cache", progress=False)
    sample = compute_stats(ArraySource(_images(40, 2)), ext, progress=False)
    assert report["metrics"]["fid"] == pytest.approx(frechet_distance(sample.mu, sample.sigma, mu, sigma))
    assert report["metrics"]["sfid"] == pytest.approx(frechet_distance(sample.mu_s, sample.sigma_s, mu_s, sigma_s))
    assert report["ref"]["fid_statistics"] == "stored mu/sigma of the reference batch"
    assert report["ref"]["sfid_statistics"] == "stored mu_s/sigma_s of the reference batch"
    assert report["protocol"] == "adm" and report["settings"]["isc_split_size"] == 5000
    assert not (tmp_path / "cache").exists()  # FID and sFID came from the stored statistics: no featurising
    # P&R need the batch's images (ADM: reference = the batch's images), which are featurised and cached
    report = evaluate(ArraySource(_images(40, 2)), str(tmp_path / "VIRTUAL_ref.npz"), "fid,prc", ext,
                      cache_dir=tmp_path / "cache", progress=False)
    assert report["ref"]["num_images"] == 30 and list((tmp_path / "cache").glob("*.npz"))


def test_a_sample_batch_with_stored_statistics_uses_them_as_adm_does(tmp_path):
    # ADM's evaluator reads mu/sigma (and mu_s/sigma_s) from the sample batch too, when it holds them;
    # its images still give IS (and P/R). The statistics stand for all the images: --num-samples ignores them.
    rng = np.random.default_rng(0)
    ext = TinyInception()
    mu, mu_s = rng.standard_normal(12), rng.standard_normal(8)
    np.savez(tmp_path / "samples.npz", arr_0=_images(40, 2), mu=mu, sigma=np.eye(12), mu_s=mu_s, sigma_s=np.eye(8))
    ref = compute_stats(ArraySource(_images(30, 1)), ext, progress=False)
    save_stats(ref, tmp_path / "ref_stats.npz")
    calls = []
    ext._forward = lambda images, forward=ext._forward: calls.append(len(images)) or forward(images)
    report = evaluate(str(tmp_path / "samples.npz"), str(tmp_path / "ref_stats.npz"), "fid,sfid", ext, progress=False)
    assert calls == []  # nothing featurised
    assert report["metrics"]["fid"] == pytest.approx(frechet_distance(mu, np.eye(12), ref.mu, ref.sigma))
    assert report["metrics"]["sfid"] == pytest.approx(frechet_distance(mu_s, np.eye(8), ref.mu_s, ref.sigma_s))
    assert report["samples"]["fid_statistics"] == "stored mu/sigma of the sample batch"
    assert report["samples"]["sfid_statistics"] == "stored mu_s/sigma_s of the sample batch"
    assert report["samples"]["num_images"] == 40 and any("sample batch's own" in n for n in report["notes"])
    report = evaluate(str(tmp_path / "samples.npz"), str(tmp_path / "ref_stats.npz"), "fid,isc", ext, progress=False)
    assert sum(calls) == 40 and report["samples"]["fid_statistics"] == "stored mu/sigma of the sample batch"
    assert report["metrics"]["fid"] == pytest.approx(frechet_distance(mu, np.eye(12), ref.mu, ref.sigma))
    first = compute_stats(ArraySource(_images(40, 2)), ext, limit=20, progress=False)
    report = evaluate(str(tmp_path / "samples.npz"), str(tmp_path / "ref_stats.npz"), "fid", ext, progress=False,
                      num_samples=20)
    assert report["samples"]["fid_statistics"] == "features of the sample images"
    assert report["metrics"]["fid"] == pytest.approx(frechet_distance(first.mu, first.sigma, ref.mu, ref.sigma))


def _adm_precision_recall(real, fake, k=3):
    """ADM's ManifoldEstimator and DistanceBlock (evaluations/evaluator.py) in NumPy float16, one block."""
    def distances(u, v):  # float16 operands and results; products summed exactly, then rounded once
        u16, v16 = u.astype(np.float16), v.astype(np.float16)
        norm_u = (u16 * u16).astype(np.float64).sum(1).astype(np.float16)[:, None]
        norm_v = (v16 * v16).astype(np.float64).sum(1).astype(np.float16)[None]
        dot = (u16.astype(np.float64) @ v16.astype(np.float64).T).astype(np.float16)
        d = np.maximum(norm_u - np.float16(2) * dot + norm_v, np.float16(0))
        assert np.isfinite(d).all()  # else ADM recomputes the block in float32
        return d.astype(np.float32)

    def radii(x):
        return np.partition(distances(x, x), np.arange(k + 1), axis=1)[:, k]

    d = distances(real, fake)                                      # rows: reference, columns: samples
    precision = (d <= radii(real)[:, None]).any(axis=0).mean()
    recall = (d <= radii(fake)[None]).any(axis=1).mean()
    return float(precision), float(recall)


def test_adm_precision_recall_uses_its_float16_distances():
    # Features in quarters: every product and sum is exact before the one rounding to float16, so ours and
    # the NumPy re-implementation agree bit for bit. Squared distances near 170 lie on float16's steps of
    # 1/8, and the norms near 500 on steps of 1/4: the float32 distances give other sets.
    rng = np.random.default_rng(0)
    real = rng.integers(0, 16, (150, 64)) / 4
    fake = rng.integers(0, 15, (130, 64)) / 4 + 0.25 * (rng.random((130, 64)) < 0.3)
    adm = _adm_precision_recall(real, fake)
    assert precision_recall(fake, real, 3, batch=64, float16=True) == adm
    assert precision_recall(fake, real, 3, batch=64) != adm  # float32


def test_statistics_need_no_network(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(0)
    ext = TinyInception()
    sample = compute_stats(ArraySource(_images(40, 3)), ext, progress=False)
    save_stats(sample, tmp_path / "samples_stats.npz")
    mu, mu_s = rng.standard_normal(12), rng.standard_normal(8)
    np.savez(tmp_path / "ref.npz", arr_0=_images(5, 1), mu=mu, sigma=np.eye(12), mu_s=mu_s, sigma_s=np.eye(8))
    monkeypatch.setattr("fid_eval.evaluation.build_extractor", lambda *a: pytest.fail("built a network"))
    rc = main(["--samples", str(tmp_path / "samples_stats.npz"), "--ref", str(tmp_path / "ref.npz"),
               "--metrics", "fid,sfid", "--out", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    assert rc == 0 and "protocol adm" in out and sample.fingerprint in out
    assert report["metrics"]["fid"] == pytest.approx(frechet_distance(sample.mu, sample.sigma, mu, np.eye(12)))
    assert report["metrics"]["sfid"] == pytest.approx(frechet_distance(sample.mu_s, sample.sigma_s, mu_s, np.eye(8)))
    assert report["extractor"]["fingerprint"] == sample.fingerprint and report["samples"]["num_images"] == 40
    assert any("carry no extractor record; assumed Inception" in n for n in report["notes"])
    # Both files carry a fingerprint: they must agree.
    other = Stats(sample.mu, sample.sigma, 40, meta={"extractor": "inception-v3-compat-ffffffffffffffff"})
    save_stats(other, tmp_path / "other.npz")
    rc = main(["--samples", str(tmp_path / "samples_stats.npz"), "--ref", str(tmp_path / "other.npz"),
               "--metrics", "fid"])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot be compared" in err and err.count("\n") == 1


def test_inception_score_adm_protocol_equals_numpy_split_formula():
    logits = np.random.default_rng(0).standard_normal((12_000, 30)) * 3  # splits of 5,000, 5,000 and 2,000
    mean, std = inception_score(logits, split_size=5000)
    assert mean == pytest.approx(_adm_inception_score(logits), rel=1e-10) and std > 0
    stats = Stats(np.zeros(12), np.eye(12), len(logits), logits=logits.astype(np.float32),
                  meta={"extractor": TinyInception.fingerprint})
    report = evaluate(stats, None, "isc", TinyInception(), progress=False)  # Inception: ADM protocol by default
    assert report["metrics"]["isc_mean"] == pytest.approx(_adm_inception_score(logits.astype(np.float32)), rel=1e-6)
    shuffled = evaluate(stats, None, "isc", TinyInception(), progress=False, protocol="torch-fidelity")
    assert shuffled["settings"]["isc_splits"] == 10 and shuffled["metrics"]["isc_mean"] != report["metrics"]["isc_mean"]
    with pytest.raises(FidEvalError, match="--isc-splits 4 is torch-fidelity's protocol"):
        evaluate(stats, None, "isc", TinyInception(), progress=False, isc_splits=4)
    with pytest.raises(FidEvalError, match="ADM's precision/recall uses k = 3"):
        evaluate(stats, stats, "prc", TinyInception(), progress=False, prc_k=5)


class NaNExtractor(TinyInception):
    """NaN in the second batch's second row."""

    calls = 0

    def _forward(self, images):
        pool, logits, spatial = super()._forward(images)
        self.calls += 1
        if self.calls == 2:
            pool[1, 3] = float("nan")
        return pool, logits, spatial


def test_non_finite_features_and_statistics_are_refused(tmp_path, capsys):
    with pytest.raises(FidEvalError, match="non-finite features for image 5 of array"):
        compute_stats(ArraySource(_images(10, 0)), NaNExtractor(), batch_size=4, progress=False)
    ext = TinyInception()
    good = compute_stats(ArraySource(_images(20, 0)), ext, progress=False)
    save_stats(good, tmp_path / "good.npz")
    cases = {"mu": ("mu", np.nan), "sigma": ("sigma", np.nan), "sigma_s": ("sigma_s", np.inf),
             "features": ("features", np.nan)}
    for name, (key, bad) in cases.items():
        arrays = {k: getattr(good, k) for k in ("mu", "sigma", "mu_s", "sigma_s", "features", "logits")}
        arrays[key] = arrays[key].copy()
        arrays[key].flat[0] = bad
        np.savez(tmp_path / f"{name}.npz", meta=np.array(json.dumps(good.meta)), **arrays)
        rc = main(["--samples", str(tmp_path / "good.npz"), "--ref", str(tmp_path / f"{name}.npz"),
                   "--metrics", "fid,sfid"])
        err = capsys.readouterr().err
        assert rc == 2 and f"'{key}' holds 1 NaN/inf value" in err and err.count("\n") == 1, (name, err)
