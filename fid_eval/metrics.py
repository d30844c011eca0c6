"""The metrics, computed from features or feature statistics alone (no network in this file).

FID from Gaussian statistics, Inception Score from classifier logits, KID from features (polynomial-kernel
MMD over random subsets), improved precision/recall from features (k-NN balls). Conventions follow
torch-fidelity 0.4 (IS: 10 splits over a shuffled order with seed 2020; KID: cubic kernel, 100 subsets
of 1000, unbiased MMD^2; P&R: k = 3), so our numbers equal what torch-fidelity prints for the same
features; tests/fid_eval/test_fid_metrics.py checks each one against an independent computation.
"""

from __future__ import annotations

import numpy as np
import torch

from fid_eval.errors import FidEvalError

DEFAULT_SEED = 2020  # torch-fidelity's rng_seed: IS shuffle and KID subsets


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) in float64 of features (N, D); N >= 2."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise FidEvalError(f"statistics need at least 2 feature vectors (N, D), got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


# Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017, FID):
#   |mu1 - mu2|^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr((sigma1 sigma2)^(1/2)).
# Tr((s1 s2)^(1/2)) equals the sum of square roots of the eigenvalues of the symmetric PSD matrix
# s1^(1/2) s2 s1^(1/2) (same spectrum as s1 s2), so two symmetric eigendecompositions replace the
# general sqrtm that ADM / pytorch-fid use: no complex parts, no failures on singular covariances.
def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """FID between two Gaussians given by means (D,) and covariances (D, D); float64 throughout."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise FidEvalError(
            f"statistics do not match: mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 {mu2.shape}, "
            f"sigma2 {sigma2.shape}; expected (D,) and (D, D) with one D (same feature extractor)"
        )
    evals1, evecs1 = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    sqrt1 = (evecs1 * np.sqrt(np.clip(evals1, 0, None))) @ evecs1.T  # sigma1^(1/2)
    inner = sqrt1 @ sigma2 @ sqrt1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


# Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))), averaged over `splits` disjoint
# parts of the (seeded, shuffled) samples; std over the parts.
def inception_score(logits: np.ndarray | torch.Tensor,
                    splits: int = 10,        # torch-fidelity's isc_splits
                    seed: int = DEFAULT_SEED,
                    shuffle: bool = True,
                    ) -> tuple[float, float]:
    """(mean, std) of the Inception Score of logits (N, K), N >= splits."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    n = logits.shape[0]
    if logits.ndim != 2 or n < splits or splits < 1:
        raise FidEvalError(f"Inception Score needs logits (N, K) with N >= splits={splits}, got {tuple(logits.shape)}")
    if shuffle:
        logits = logits[torch.from_numpy(np.random.RandomState(seed).permutation(n))]
    log_p = logits.log_softmax(dim=1)                    # (N, K)
    scores = []
    for i in range(splits):
        part = log_p[i * n // splits:(i + 1) * n // splits]
        log_q = part.exp().mean(dim=0).log()             # (K,) marginal p(y) of this part
        kl = (part.exp() * (part - log_q)).sum(dim=1)    # (n_part,)
        scores.append(kl.mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


# KID (Binkowski et al. 2018): unbiased MMD^2 with the kernel k(x, y) = (x.y / D + 1)^3, averaged over
# `subsets` random subsets of m = subset_size vectors from each side (m shrinks to the smaller count).
def kernel_inception_distance(features1: np.ndarray,
                              features2: np.ndarray,
                              subsets: int = 100,
                              subset_size: int = 1000,
                              seed: int = DEFAULT_SEED,
                              ) -> tuple[float, float, int]:
    """(mean, std, subset size used) of KID between features1 (N1, D) and features2 (N2, D)."""
    f1 = np.asarray(features1, dtype=np.float64)
    f2 = np.asarray(features2, dtype=np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise FidEvalError(f"KID needs features (N1, D) and (N2, D), got {f1.shape} and {f2.shape}")
    m = min(subset_size, len(f1), len(f2))
    if m < 2:
        raise FidEvalError(f"KID needs at least 2 feature vectors on each side, got {len(f1)} and {len(f2)}")
    d = f1.shape[1]
    rng = np.random.RandomState(seed)
    mmds = np.empty(subsets)
    for i in range(subsets):
        x = f1[rng.choice(len(f1), m, replace=False)]
        y = f2[rng.choice(len(f2), m, replace=False)]
        k_xx = (x @ x.T / d + 1) ** 3
        k_yy = (y @ y.T / d + 1) ** 3
        k_xy = (x @ y.T / d + 1) ** 3
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        mmds[i] = within - 2 * k_xy.sum() / (m * m)
    return float(mmds.mean()), float(mmds.std()), m


def _kth_neighbour_radius(features: torch.Tensor, k: int, batch: int) -> torch.Tensor:
    """Distance (N,) from each row of features (N, D) to its k-th nearest other row."""
    radii = [torch.cdist(part, features).kthvalue(k + 1, dim=1).values  # +1: the row itself at distance 0
             for part in features.split(batch)]
    return torch.cat(radii)


def _inside_any_ball(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, batch: int) -> float:
    """Fraction of points (N, D) within radii[j] of some centre j (M, D)."""
    inside = [(torch.cdist(part, centres) <= radii[None]).any(dim=1) for part in points.split(batch)]
    return torch.cat(inside).float().mean().item()


# Improved precision and recall (Kynkaanniemi et al. 2019): each set's manifold is the union of balls
# reaching each feature's k-th nearest neighbour in the same set. Precision = share of generated samples
# inside the real manifold; recall = share of real samples inside the generated manifold.
def precision_recall(fake: np.ndarray | torch.Tensor,
                     real: np.ndarray | torch.Tensor,
                     k: int = 3,
                     batch: int = 2048,       # rows of the distance matrix held at once
                     device: str | torch.device = "cpu",
                     ) -> tuple[float, float]:
    """(precision, recall) of generated features fake (N1, D) against real features (N2, D)."""
    fake = torch.as_tensor(np.asarray(fake), dtype=torch.float32, device=device)
    real = torch.as_tensor(np.asarray(real), dtype=torch.float32, device=device)
    if fake.ndim != 2 or real.ndim != 2 or fake.shape[1] != real.shape[1]:
        raise FidEvalError(f"precision/recall needs features (N1, D) and (N2, D), got "
                           f"{tuple(fake.shape)} and {tuple(real.shape)}")
    if min(len(fake), len(real)) <= k:
        raise FidEvalError(f"precision/recall with k={k} needs more than {k} feature vectors on each side, "
                           f"got {len(fake)} and {len(real)}")
    precision = _inside_any_ball(fake, real, _kth_neighbour_radius(real, k, batch), batch)
    recall = _inside_any_ball(real, fake, _kth_neighbour_radius(fake, k, batch), batch)
    return precision, recall
