"""Evaluation of generated images: features -> cached statistics -> metrics (FID, IS, KID, precision/recall).

Inception features come from torch-fidelity's `inception-v3-compat` (local weights file, no download);
the offline `digits` extractor scores the embedded-digits demo. See `python -m fid_eval --help`.
"""

from fid_eval.errors import FidEvalError
from fid_eval.evaluation import METRICS, evaluate, format_table
from fid_eval.extractors import build_extractor
from fid_eval.inputs import ArraySource, open_images
from fid_eval.metrics import (
    feature_stats,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)
from fid_eval.stats import Stats, cached_stats, compute_stats, load_stats, save_stats

__all__ = [
    "METRICS",
    "ArraySource",
    "FidEvalError",
    "Stats",
    "build_extractor",
    "cached_stats",
    "compute_stats",
    "evaluate",
    "feature_stats",
    "format_table",
    "frechet_distance",
    "inception_score",
    "kernel_inception_distance",
    "load_stats",
    "open_images",
    "precision_recall",
    "save_stats",
]
