"""The metrics, computed from features or feature statistics alone (no network in this file).

FID (and sFID, the same distance on spatial features) from Gaussian statistics, Inception Score from
classifier logits, KID from features (polynomial-kernel MMD over random subsets), improved
precision/recall from features (k-NN balls). Two protocols fix the free choices:
  torch-fidelity 0.4: IS over 10 splits of a shuffled order (seed 2020); KID cubic kernel, 100 subsets of
                      1000, unbiased MMD^2; P&R k = 3. Our numbers equal torch-fidelity's for the same features.
  ADM (openai/guided-diffusion evaluations/evaluator.py, behind DiT/SiT/GSPN tables): IS over consecutive
                      splits of 5,000 in sample order, no shuffle; P&R k = 3 against the reference batch's images,
                      squared distances in float16.
tests/fid_eval/test_fid_metrics.py checks each one against an independent computation.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from fid_eval.errors import FidEvalError

DEFAULT_SEED = 2020  # torch-fidelity's rng_seed: IS shuffle and KID subsets
ADM_ISC_SPLIT_SIZE = 5000  # ADM's compute_inception_score(split_size=5000)


def check_finite(name: str, value: np.ndarray | float) -> None:
    """Raise a FidEvalError naming `name` when it holds NaN or inf (a number we must not report)."""
    array = np.asarray(value)
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise FidEvalError(f"{name} holds {bad} NaN/inf value{'s' if bad > 1 else ''} of {array.size}; "
                           "refusing to report a number from it")


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) in float64 of features (N, D); N >= 2."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise FidEvalError(f"statistics need at least 2 feature vectors (N, D), got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


class MomentAccumulator:
    """Mean (D,) and unbiased covariance (D, D) of rows fed batch by batch, without holding the rows.

    Sums are taken about the first row (a shift), in float64, so large common offsets do not cancel;
    the result equals np.mean / np.cov of the stacked rows to float64 round-off. Used for ADM's spatial
    features (2,023-d per image), which are summarised, never stored.
    """

    def __init__(self):
        self.n, self.shift, self.s1, self.s2 = 0, None, None, None

    def update(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.float64)  # (B, D)
        if self.shift is None:
            self.shift = rows[0].copy()
            self.s1, self.s2 = np.zeros_like(self.shift), np.zeros((len(self.shift),) * 2)
        d = rows - self.shift
        self.n += len(rows)
        self.s1 += d.sum(axis=0)
        self.s2 += d.T @ d

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise FidEvalError(f"statistics need at least 2 feature vectors, got {self.n}")
        mean_d = self.s1 / self.n
        cov = (self.s2 - self.n * np.outer(mean_d, mean_d)) / (self.n - 1)
        return self.shift + mean_d, (cov + cov.T) / 2


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
    for name, value in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        check_finite(f"Frechet distance input {name}", value)
    evals1, evecs1 = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    sqrt1 = (evecs1 * np.sqrt(np.clip(evals1, 0, None))) @ evecs1.T  # sigma1^(1/2)
    inner = sqrt1 @ sigma2 @ sqrt1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


# Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))), averaged over disjoint parts of the
# samples; std over the parts. torch-fidelity: `splits` equal parts of a seeded shuffle. ADM: consecutive
# parts of `split_size` in sample order (the last one may be shorter), no shuffle.
def inception_score(logits: np.ndarray | torch.Tensor,
                    splits: int = 10,        # torch-fidelity's isc_splits
                    seed: int = DEFAULT_SEED,
                    shuffle: bool = True,
                    split_size: int | None = None,  # ADM protocol: parts of this many samples, unshuffled
                    ) -> tuple[float, float]:
    """(mean, std) of the Inception Score of logits (N, K), N >= splits."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    n = logits.shape[0]
    if split_size is not None:
        if split_size < 1 or logits.ndim != 2 or n < 1:
            raise FidEvalError(f"Inception Score needs logits (N, K), N >= 1, and split size >= 1, got "
                               f"{tuple(logits.shape)} and {split_size}")
        bounds = [(start, min(start + split_size, n)) for start in range(0, n, split_size)]
    else:
        if splits < 1:
            raise FidEvalError(f"--isc-splits must be >= 1, got {splits}")
        if logits.ndim != 2 or n < splits:
            raise FidEvalError(f"Inception Score needs logits (N, K) with N >= splits={splits}, "
                               f"got {tuple(logits.shape)}")
        if shuffle:
            logits = logits[torch.from_numpy(np.random.RandomState(seed).permutation(n))]
        bounds = [(i * n // splits, (i + 1) * n // splits) for i in range(splits)]
    check_finite("Inception Score logits", logits.numpy())
    log_p = logits.log_softmax(dim=1)                    # (N, K)
    scores = []
    for start, stop in bounds:
        part = log_p[start:stop]
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
    if subsets < 1:
        raise FidEvalError(f"--kid-subsets must be >= 1, got {subsets}")
    if subset_size < 2:
        raise FidEvalError(f"--kid-subset-size must be >= 2 (an unbiased MMD needs pairs), got {subset_size}")
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise FidEvalError(f"KID needs features (N1, D) and (N2, D), got {f1.shape} and {f2.shape}")
    check_finite("KID sample features", f1)
    check_finite("KID reference features", f2)
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


def adm_squared_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Squared distances (N, M) between rows of u (N, D) and v (M, D) as ADM's DistanceBlock computes them:
    max(|u|^2 - 2 u.v + |v|^2, 0) in float16 (products accumulated in float32, each result rounded to
    float16), or in float32 when any float16 entry is not finite."""
    with _full_precision_reductions():
        u16, v16 = u.half(), v.half()
        d = ((u16 * u16).sum(1)[:, None] - 2 * (u16 @ v16.T) + (v16 * v16).sum(1)[None]).clamp_min(0)
    if torch.isfinite(d).all():
        return d.float()
    return ((u * u).sum(1)[:, None] - 2 * (u @ v.T) + (v * v).sum(1)[None]).clamp_min(0)


@contextlib.contextmanager
def _full_precision_reductions():
    """cuBLAS float16 matmuls accumulate in float32 throughout (as TensorFlow's do), not in float16 parts."""
    cuda = torch.backends.cuda.matmul
    before = cuda.allow_fp16_reduced_precision_reduction
    cuda.allow_fp16_reduced_precision_reduction = False
    try:
        yield
    finally:
        cuda.allow_fp16_reduced_precision_reduction = before


def _kth_neighbour_radius(features: torch.Tensor, k: int, batch: int, distances=torch.cdist) -> torch.Tensor:
    """Distance (N,) from each row of features (N, D) to its k-th nearest other row."""
    radii = [distances(part, features).kthvalue(k + 1, dim=1).values  # +1: the row itself at distance 0
             for part in features.split(batch)]
    return torch.cat(radii)


def _inside_any_ball(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, batch: int) -> float:
    """Fraction of points (N, D) within radii[j] of some centre j (M, D)."""
    inside = [(torch.cdist(part, centres) <= radii[None]).any(dim=1) for part in points.split(batch)]
    return torch.cat(inside).float().mean().item()


def _adm_precision_recall(fake: torch.Tensor, real: torch.Tensor, k: int, batch: int) -> tuple[float, float]:
    """ADM's ManifoldEstimator: squared float16 distances, every one taken as (reference row, sample column)."""
    real_radii = _kth_neighbour_radius(real, k, batch, adm_squared_distances)
    fake_radii = _kth_neighbour_radius(fake, k, batch, adm_squared_distances)
    fake_in = torch.zeros(len(fake), dtype=torch.bool, device=fake.device)
    real_in = []
    for start in range(0, len(real), batch):
        d = adm_squared_distances(real[start:start + batch], fake)                 # (b, N_fake)
        fake_in |= (d <= real_radii[start:start + batch, None]).any(dim=0)
        real_in.append((d <= fake_radii[None]).any(dim=1))
    return fake_in.double().mean().item(), torch.cat(real_in).double().mean().item()  # ADM: float64 means


def precision_recall(fake: np.ndarray | torch.Tensor,
                     real: np.ndarray | torch.Tensor,
                     k: int = 3,
                     batch: int = 2048,       # rows of the distance matrix held at once
                     device: str | torch.device = "cpu",
                     float16: bool = False,   # ADM's distances (`adm_squared_distances`); else float32 cdist
                     ) -> tuple[float, float]:
    """(precision, recall) of generated features fake (N1, D) against real features (N2, D).

    ADM's evaluator computes the same sets (k-th neighbour radii, reference = its batch's images) with
    squared distances in float16 when they are finite; `float16=True` does the same. In float32 fewer
    distances tie with a radius at float16's coarser steps, so precision and recall read a little lower.
    """
    if k < 1:
        raise FidEvalError(f"--prc-k must be >= 1, got {k}")
    check_finite("precision/recall sample features", np.asarray(fake))
    check_finite("precision/recall reference features", np.asarray(real))
    fake = torch.as_tensor(np.asarray(fake), dtype=torch.float32, device=device)
    real = torch.as_tensor(np.asarray(real), dtype=torch.float32, device=device)
    if fake.ndim != 2 or real.ndim != 2 or fake.shape[1] != real.shape[1]:
        raise FidEvalError(f"precision/recall needs features (N1, D) and (N2, D), got "
                           f"{tuple(fake.shape)} and {tuple(real.shape)}")
    if min(len(fake), len(real)) <= k:
        raise FidEvalError(f"precision/recall with k={k} needs more than {k} feature vectors on each side, "
                           f"got {len(fake)} and {len(real)}")
    if float16:
        return _adm_precision_recall(fake, real, k, batch)
    precision = _inside_any_ball(fake, real, _kth_neighbour_radius(real, k, batch), batch)
    recall = _inside_any_ball(real, fake, _kth_neighbour_radius(fake, k, batch), batch)
    return precision, recall
