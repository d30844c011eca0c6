"""Metric math against independent computations: scipy's sqrtm, closed forms, hand sums, torch-fidelity."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from fid_eval.errors import FidEvalError
from fid_eval.metrics import (
    feature_stats,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)


def _random_cov(rng, d, rank=None):
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / d


def _fid_scipy(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


@pytest.mark.parametrize("d", [1, 3, 16])
def test_fid_matches_scipy_sqrtm(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_fid_scipy(mu1, s1, mu2, s2), rel=1e-8, abs=1e-10)


def test_fid_closed_form_for_commuting_covariances():
    # Same eigenbasis Q: Tr((s1 s2)^1/2) = sum sqrt(a_i b_i), so FID = |dmu|^2 + sum (sqrt a_i - sqrt b_i)^2.
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    a, b = np.array([4.0, 1.0, 0.25, 9.0, 0.0]), np.array([1.0, 1.0, 1.0, 4.0, 2.0])  # one zero: singular s1
    mu1, mu2 = np.arange(5.0), np.arange(5.0)[::-1]
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    fid = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert fid == pytest.approx(expected, rel=1e-9)
    # 1-D Gaussians N(0, 4) and N(3, 1): 9 + (2 - 1)^2 = 10
    assert frechet_distance([0.0], [[4.0]], [3.0], [[1.0]]) == pytest.approx(10.0)


def test_fid_of_identical_statistics_is_zero_even_when_rank_deficient():
    rng = np.random.default_rng(1)
    mu, sigma = feature_stats(rng.standard_normal((10, 32)))  # rank 9 < 32
    # zero eigenvalues come out as +-1e-16 and their square roots as 1e-8: ~1e-6 is round-off here
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-5 * np.trace(sigma)


def test_fid_rejects_mismatched_dimensions():
    with pytest.raises(FidEvalError, match="same feature extractor"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_feature_stats_are_mean_and_unbiased_covariance():
    x = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 8.0]])
    mu, sigma = feature_stats(x)
    assert np.allclose(mu, [2.0, 4.0])
    assert np.allclose(sigma, [[4.0, 7.0], [7.0, 13.0]])  # sums of products / (N - 1)
    with pytest.raises(FidEvalError, match="at least 2"):
        feature_stats(x[:1])


def test_inception_score_by_hand():
    p = np.array([[0.9, 0.1], [0.2, 0.8]])
    q = p.mean(axis=0)  # (0.55, 0.45)
    kl = [sum(p[i, j] * math.log(p[i, j] / q[j]) for j in range(2)) for i in range(2)]
    mean, std = inception_score(np.log(p), splits=1)
    assert mean == pytest.approx(math.exp(sum(kl) / 2), rel=1e-12)
    assert std == 0.0


def test_inception_score_limits():
    k = 7
    confident = np.eye(k).repeat(10, axis=0) * 50.0  # every class equally often, each sample certain
    assert inception_score(confident, splits=1)[0] == pytest.approx(k, rel=1e-6)
    assert inception_score(np.zeros((20, k)), splits=2)[0] == pytest.approx(1.0)
    with pytest.raises(FidEvalError, match="N >= splits"):
        inception_score(np.zeros((3, k)), splits=10)


def _mmd2_unbiased_by_hand(x, y):
    d, m = x.shape[1], len(x)
    k = lambda a, b: (sum(ai * bi for ai, bi in zip(a, b)) / d + 1) ** 3
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_by_hand_on_tiny_inputs():
    x = np.array([[0.0, 1.0], [1.0, 0.5], [2.0, -1.0]])
    y = np.array([[1.0, 1.0], [0.0, 0.0], [-1.0, 2.0]])
    # one subset of all 3 vectors: the subset is a permutation and MMD^2 does not depend on order
    mean, std, used = kernel_inception_distance(x, y, subsets=1, subset_size=1000)
    assert used == 3
    assert mean == pytest.approx(_mmd2_unbiased_by_hand(x, y), rel=1e-12)
    assert std == 0.0
    assert kernel_inception_distance(x, x, subsets=3)[0] == pytest.approx(_mmd2_unbiased_by_hand(x, x))


def test_kid_subset_shrinks_to_the_smaller_set():
    rng = np.random.default_rng(0)
    _, _, used = kernel_inception_distance(rng.standard_normal((50, 4)), rng.standard_normal((20, 4)), subsets=2)
    assert used == 20


def test_precision_recall_by_hand():
    real = np.array([[0.0], [1.0], [2.0], [3.0], [4.0]])  # k=1 radius of every real point: 1
    fake = np.array([[0.5], [10.0]])                       # k=1 radius of each fake point: 9.5
    precision, recall = precision_recall(fake, real, k=1)
    assert precision == 0.5  # 0.5 lies in a real ball, 10 does not
    assert recall == 1.0     # every real point lies within 9.5 of 0.5
    with pytest.raises(FidEvalError, match="more than 3"):
        precision_recall(fake, real, k=3)


def test_metrics_equal_torch_fidelity_on_random_features():
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    rng = np.random.default_rng(0)
    f1 = rng.standard_normal((60, 8)).astype(np.float32) + 0.3
    f2 = rng.standard_normal((50, 8)).astype(np.float32)
    logits = rng.standard_normal((60, 5)).astype(np.float32) * 3

    isc = isc_features_to_metric(torch.from_numpy(logits), splits=3)
    assert inception_score(logits, splits=3) == pytest.approx(
        (isc["inception_score_mean"], isc["inception_score_std"]), rel=1e-10)
    kid = kid_features_to_metric(torch.from_numpy(f1), torch.from_numpy(f2), kid_subsets=5, kid_subset_size=40,
                                 verbose=False)
    ours = kernel_inception_distance(f1, f2, subsets=5, subset_size=40)
    assert ours[:2] == pytest.approx((kid["kernel_inception_distance_mean"], kid["kernel_inception_distance_std"]),
                                     rel=1e-4)
    prc = prc_features_to_metric(torch.from_numpy(f1), torch.from_numpy(f2), verbose=False)
    assert precision_recall(f1, f2, k=3) == pytest.approx((prc["precision"], prc["recall"]))
