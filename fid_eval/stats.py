"""Statistics: what an image set becomes after featurisation, saved, loaded and cached by content hash.

A Stats holds the Gaussian statistics FID needs (mu, sigma) and, when made by us, the features
(for KID and P&R) and logits (for IS), plus `meta` naming the extractor fingerprint and the source.
Files are `.npz` (no pickle; meta is a JSON string) or `.pt` (a dict of tensors and the JSON string),
written under a temp name then renamed. Foreign statistics with only `mu`/`sigma` (an ADM batch's
stored ones, pytorch-fid's) are read too, as Inception pool3 statistics.
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
from fid_eval.extractors import Extractor
from fid_eval.inputs import ImageSource
from fid_eval.metrics import feature_stats

CACHE_ENV = "GSPN_FID_CACHE"
CACHE_VERSION = 1  # bump when featurisation changes, so old cache entries are not reused


@dataclasses.dataclass
class Stats:
    mu: np.ndarray                      # (D,) float64
    sigma: np.ndarray                   # (D, D) float64
    num_images: int
    features: np.ndarray | None = None  # (N, D) float32, for KID and precision/recall
    logits: np.ndarray | None = None    # (N, K) float32, for IS
    meta: dict = dataclasses.field(default_factory=dict)  # extractor fingerprint, source, content hash

    @property
    def fingerprint(self) -> str | None:
        return self.meta.get("extractor")


def default_cache_dir() -> Path:
    """$GSPN_FID_CACHE, else ~/.cache/gspn_gen/fid_stats."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gspn_gen" / "fid_stats").expanduser()


def save_stats(stats: Stats, path: str | Path) -> None:
    """Write stats to `path` (.npz or .pt), via a temp file renamed into place."""
    path = Path(path)
    arrays = {"mu": stats.mu, "sigma": stats.sigma, "num_images": np.array(stats.num_images)}
    if stats.features is not None:
        arrays["features"] = stats.features
    if stats.logits is not None:
        arrays["logits"] = stats.logits
    meta = json.dumps(stats.meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        if path.suffix == ".pt":
            torch.save({**{k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()}, "meta": meta}, f)
        elif path.suffix == ".npz":
            np.savez(f, meta=np.array(meta), **arrays)
        else:
            tmp.unlink()
            raise FidEvalError(f"{path}: statistics files end in .npz or .pt")
    os.replace(tmp, path)


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
    mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise FidEvalError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not (D,) and (D, D)")
    meta = data.get("meta", "{}")
    meta = json.loads(str(meta)) if not isinstance(meta, dict) else meta
    meta.setdefault("source", str(path))
    features, logits = data.get("features"), data.get("logits")
    return Stats(mu, sigma, int(data.get("num_images", -1 if features is None else len(features))),
                 features=features, logits=logits, meta=meta)


def compute_stats(source: ImageSource,
                  extractor: Extractor,
                  batch_size: int = 64,
                  limit: int | None = None,   # first `limit` images only
                  progress: bool = True,
                  ) -> Stats:
    """Featurise every image of `source` (batch by batch, with a progress bar) and summarise."""
    from tqdm import tqdm

    n = source.num_images if limit is None else min(limit, source.num_images)
    features, logits = [], []
    with tqdm(total=n, unit="img", desc=f"{extractor.name} features of {source.name}", file=sys.stderr,
              disable=not progress, dynamic_ncols=True) as bar:
        for batch in source.batches(batch_size, limit):
            f, lg = extractor(batch)
            features.append(f)
            logits.append(lg)
            bar.update(len(batch))
    features, logits = np.concatenate(features), np.concatenate(logits)
    mu, sigma = feature_stats(features)
    meta = {"extractor": extractor.fingerprint, "source": source.name, "image_size": list(source.image_size)}
    return Stats(mu, sigma, len(features), features, logits, meta)


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
