"""Statistics: what an image set becomes after featurisation, saved, loaded and cached by content hash.

A Stats holds the Gaussian statistics FID needs (mu, sigma), those sFID needs (mu_s, sigma_s, the
names of ADM's reference batches) when the extractor has spatial features, and, when made by us, the
features (for KID and P&R) and logits (for IS), plus `meta` naming the extractor fingerprint and the
source. Files are `.npz` (no pickle; meta is a JSON string) or `.pt` (a dict of tensors and the JSON
string), written under a temp name then renamed. Foreign statistics with only `mu`/`sigma` (an ADM
batch's stored ones, pytorch-fid's) are read too, as Inception pool3 (and spatial) statistics.
Statistics holding NaN or inf are refused when read or computed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from fid_eval.errors import FidEvalError
from fid_eval.features import Extractor
from fid_eval.fileio import atomic_write
from fid_eval.inputs import ImageSource
from fid_eval.metrics import MomentAccumulator, check_finite, feature_stats

CACHE_ENV = "GSPN_FID_CACHE"
CACHE_VERSION = 2  # bump when featurisation changes, so old cache entries are not reused (2: sFID statistics)
ARRAYS = ("mu", "sigma", "mu_s", "sigma_s", "features", "logits")


@dataclasses.dataclass
class Stats:
    mu: np.ndarray                      # (D,) float64
    sigma: np.ndarray                   # (D, D) float64
    num_images: int
    features: np.ndarray | None = None  # (N, D) float32, for KID and precision/recall
    logits: np.ndarray | None = None    # (N, K) float32, for IS
    meta: dict = dataclasses.field(default_factory=dict)  # extractor fingerprint, source, content hash
    mu_s: np.ndarray | None = None      # (S,) float64, spatial features' mean, for sFID
    sigma_s: np.ndarray | None = None   # (S, S) float64

    @property
    def fingerprint(self) -> str | None:
        return self.meta.get("extractor")

    @property
    def image_size(self) -> tuple[int, int] | None:
        size = self.meta.get("image_size")
        return tuple(size) if size else None


def default_cache_dir() -> Path:
    """$GSPN_FID_CACHE, else ~/.cache/gspn_gen/fid_stats."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gspn_gen" / "fid_stats").expanduser()


def save_stats(stats: Stats, path: str | Path) -> None:
    """Write stats to `path` (.npz or .pt), via a temp file renamed into place."""
    path = Path(path)
    arrays = {k: getattr(stats, k) for k in ARRAYS if getattr(stats, k) is not None}
    arrays["num_images"] = np.array(stats.num_images)
    meta = json.dumps(stats.meta)
    if path.suffix not in (".pt", ".npz"):
        raise FidEvalError(f"{path}: statistics files end in .npz or .pt")
    with atomic_write(path) as f:
        if path.suffix == ".pt":
            torch.save({**{k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()}, "meta": meta}, f)
        else:
            np.savez(f, meta=np.array(meta), **arrays)


def load_stats(path: str | Path) -> Stats:
    """Read a statistics file (.npz or .pt) that holds at least `mu` and `sigma`."""
    path = Path(path)
    try:
        if path.suffix == ".pt":
            raw = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(raw, dict):
                raise FidEvalError(f"{path}: expected a dict with 'mu' and 'sigma', got {type(raw).__name__}")
            data = {k: (v.numpy() if torch.is_tensor(v) else v) for k, v in raw.items()}
        else:
            with np.load(path, allow_pickle=False) as npz:
                data = {k: npz[k] for k in npz.files}
    except FidEvalError:
        raise
    except Exception as e:  # noqa: BLE001 - a corrupt file of any kind gets one line
        raise FidEvalError(f"{path}: not a readable statistics file ({type(e).__name__}: {e})") from None
    if "mu" not in data or "sigma" not in data:
        raise FidEvalError(f"{path}: statistics need 'mu' and 'sigma' (keys: {sorted(data)})")
    mu, sigma = gaussian_arrays(data, "mu", "sigma", path)
    mu_s, sigma_s = gaussian_arrays(data, "mu_s", "sigma_s", path) if "mu_s" in data else (None, None)
    try:
        meta = data.get("meta", "{}")
        meta = json.loads(str(meta)) if not isinstance(meta, dict) else meta
        features, logits = data.get("features"), data.get("logits")
        num_images = int(data.get("num_images", -1 if features is None else len(features)))
    except (ValueError, TypeError) as e:
        raise FidEvalError(f"{path}: malformed statistics file ({type(e).__name__}: {e})") from None
    for name, value in (("features", features), ("logits", logits)):
        if value is not None:
            check_finite(f"{path}: '{name}'", value)
    meta.setdefault("source", str(path))
    return Stats(mu, sigma, num_images, features=features, logits=logits, meta=meta, mu_s=mu_s, sigma_s=sigma_s)


def gaussian_arrays(data, mean_key: str, cov_key: str, where) -> tuple[np.ndarray, np.ndarray]:
    """data[mean_key] (D,) and data[cov_key] (D, D) as float64, checked for shape and finiteness."""
    if cov_key not in data:
        raise FidEvalError(f"{where}: '{mean_key}' without '{cov_key}'")
    try:
        mean, cov = np.asarray(data[mean_key], np.float64), np.asarray(data[cov_key], np.float64)
    except (ValueError, TypeError) as e:
        raise FidEvalError(f"{where}: '{mean_key}'/'{cov_key}' are not numeric arrays ({e})") from None
    if mean.ndim != 1 or cov.shape != (mean.shape[0], mean.shape[0]):
        raise FidEvalError(f"{where}: {mean_key} {mean.shape} and {cov_key} {cov.shape} are not (D,) and (D, D)")
    check_finite(f"{where}: '{mean_key}'", mean)
    check_finite(f"{where}: '{cov_key}'", cov)
    return mean, cov


def compute_stats(source: ImageSource,
                  extractor: Extractor,
                  batch_size: int = 64,
                  limit: int | None = None,   # first `limit` images only
                  progress: bool = True,
                  ) -> Stats:
    """Featurise every image of `source` (batch by batch, with a progress bar) and summarise.

    Spatial features (sFID) are summarised on the fly, never stored. Non-finite features are refused.
    """
    from tqdm import tqdm

    n = source.num_images if limit is None else min(limit, source.num_images)
    if n < 1:
        raise FidEvalError(f"{source.name}: no images to featurise (limit {limit})")
    features, logits, spatial = [], [], MomentAccumulator()
    done = 0
    with tqdm(total=n, unit="img", desc=f"{extractor.name} features of {source.name}", file=sys.stderr,
              disable=not progress, dynamic_ncols=True) as bar:
        for batch in source.batches(batch_size, limit):
            out = extractor(batch)
            for name, value in zip(out._fields, out):
                if value is not None and not np.isfinite(value).all():
                    bad = done + int(np.flatnonzero(~np.isfinite(value).reshape(len(value), -1).all(axis=1))[0])
                    raise FidEvalError(f"{extractor.name} gives non-finite {name} for image {bad} of {source.name}: "
                                       "the image or the weights are broken; refusing to score it")
            features.append(out.features)
            logits.append(out.logits)
            if out.spatial is not None:
                spatial.update(out.spatial)
            done += len(batch)
            bar.update(len(batch))
    features, logits = np.concatenate(features), np.concatenate(logits)
    mu, sigma = feature_stats(features)
    mu_s, sigma_s = spatial.result() if spatial.n else (None, None)
    meta = {"extractor": extractor.fingerprint, "source": source.name, "image_size": list(source.image_size)}
    return Stats(mu, sigma, len(features), features, logits, meta, mu_s=mu_s, sigma_s=sigma_s)


def cached_stats(source: ImageSource,
                 extractor: Extractor,
                 cache_dir: str | Path | None = None,   # default_cache_dir() when None
                 batch_size: int = 64,
                 progress: bool = True,
                 ) -> Stats:
    """compute_stats, reading/writing `<cache_dir>/<key>.npz`, key = hash(content hash, extractor)."""
    content = source.content_hash()
    key = hashlib.sha256(f"v{CACHE_VERSION}:{content}:{extractor.fingerprint}".encode()).hexdigest()[:32]
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"{key}.npz"
    if path.is_file():
        try:
            stats = load_stats(path)
            stats.meta["source"], stats.meta["cache"] = source.name, str(path)
            return stats
        except FidEvalError as e:
            print(f"fid_eval: ignoring unreadable cache entry ({e}); recomputing", file=sys.stderr)
    stats = compute_stats(source, extractor, batch_size, progress=progress)
    stats.meta["content_sha256"] = content
    save_stats(stats, path)
    stats.meta["cache"] = str(path)
    return stats


def stored_stats(source: ImageSource) -> Stats | None:
    """The Inception statistics an ADM reference batch carries (mu/sigma, and mu_s/sigma_s when present).

    They were made by ADM's TensorFlow Inception and carry no fingerprint; None when the batch has none.
    """
    data = source.stored_stats
    if not data:
        return None
    mu, sigma = gaussian_arrays(data, "mu", "sigma", source.name)
    mu_s, sigma_s = gaussian_arrays(data, "mu_s", "sigma_s", source.name) if "mu_s" in data else (None, None)
    meta = {"source": source.name, "image_size": list(source.image_size)}
    return Stats(mu, sigma, source.num_images, meta=meta, mu_s=mu_s, sigma_s=sigma_s)
