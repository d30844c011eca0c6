"""Samples + reference -> metrics report (a dict that is the JSON output) and its table.

Featurises only what the requested metrics need: FID needs (mu, sigma) of both sides, IS the samples'
logits, KID and precision/recall the features of both sides. The reference is cached by content hash;
an ADM reference batch's stored Inception mu/sigma are used for FID when present.
"""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np

from fid_eval.errors import FidEvalError
from fid_eval.extractors import Extractor, build_extractor
from fid_eval.inputs import ImageSource, is_stats_file, open_images
from fid_eval.metrics import (
    DEFAULT_SEED,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)
from fid_eval.stats import Stats, cached_stats, compute_stats, load_stats

METRICS = ("fid", "isc", "kid", "prc")
FULL_FID_SAMPLES = 50_000


def parse_metrics(metrics: str | list[str] | tuple[str, ...]) -> list[str]:
    """"fid,isc" or ["fid", "isc"] -> validated list in canonical order."""
    names = [m.strip().lower() for m in (metrics.split(",") if isinstance(metrics, str) else metrics) if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise FidEvalError(f"unknown metrics {unknown or names}; expected a comma list of {', '.join(METRICS)}")
    return [m for m in METRICS if m in names]


def open_input(spec: str | Path | ImageSource | Stats, workers: int | None = None) -> ImageSource | Stats:
    """A CLI input: digits:<split>, an image folder, an ADM .npz, or a statistics .npz/.pt."""
    if isinstance(spec, (ImageSource, Stats)):
        return spec
    path = Path(str(spec)).expanduser()
    if path.is_file() and is_stats_file(path):
        return load_stats(path)
    return open_images(str(spec), workers)


def check_compatible(stats: Stats, extractor: Extractor, role: str) -> list[str]:
    """Refuse statistics made by another extractor; return notes about assumptions made."""
    name = stats.meta.get("source", role)
    if stats.mu.shape[0] != extractor.feature_dim:
        raise FidEvalError(f"{role} statistics {name} have {stats.mu.shape[0]}-d features but extractor "
                           f"{extractor.name} gives {extractor.feature_dim}-d: recompute them with this extractor")
    if stats.fingerprint is None:
        if extractor.name != "inception":
            raise FidEvalError(f"{role} statistics {name} do not say which extractor made them; "
                               f"only Inception statistics may be foreign: recompute with `python -m fid_eval stats`")
        return [f"{role} statistics {name} carry no extractor record; assumed Inception pool3 (ADM / pytorch-fid)"]
    if stats.fingerprint != extractor.fingerprint:
        raise FidEvalError(f"{role} statistics {name} were made by {stats.fingerprint}, not by {extractor.fingerprint} "
                           f"(the extractor/weights in use): recompute them with the same --extractor and --weights")
    return []


def _require(stats: Stats, field: str, metric: str, role: str) -> np.ndarray:
    value = getattr(stats, field)
    if value is None:
        raise FidEvalError(f"{metric} needs the {role}'s {field}, but {stats.meta.get('source', role)} holds only "
                           f"mu/sigma: pass the images, or statistics made by `python -m fid_eval stats`")
    return value


def evaluate(samples: str | Path | ImageSource | Stats,
             ref: str | Path | ImageSource | Stats | None,
             metrics: str | list[str] = METRICS,
             extractor: str | Extractor = "inception",
             weights: str | None = None,          # extractor weights file; its default location when None
             batch_size: int = 64,
             device: str | None = None,           # cuda when available when None
             cache_dir: str | Path | None = None,  # reference statistics cache; default_cache_dir() when None
             use_cache: bool = True,
             num_samples: int | None = None,      # score the first num_samples samples only
             isc_splits: int = 10,
             kid_subsets: int = 100,
             kid_subset_size: int = 1000,
             prc_k: int = 3,
             seed: int = DEFAULT_SEED,
             workers: int | None = None,          # image decoding threads for folders
             progress: bool = True,
             ) -> dict:
    """Score `samples` against `ref`; returns the report (metrics, inputs, extractor, settings, notes)."""
    metrics = parse_metrics(metrics)
    needs_ref = any(m in metrics for m in ("fid", "kid", "prc"))
    if needs_ref and ref is None:
        raise FidEvalError(f"metrics {metrics} need a reference: pass --ref")
    sample_in = open_input(samples, workers)
    ref_in = open_input(ref, workers) if needs_ref else None
    ext = extractor if isinstance(extractor, Extractor) else build_extractor(extractor, weights, device)
    notes = [ext.note]

    # Samples: features from images (never cached: they change every run), or a statistics file.
    if isinstance(sample_in, Stats):
        notes += check_compatible(sample_in, ext, "samples")
        sample_stats = sample_in
    else:
        sample_stats = compute_stats(sample_in, ext, batch_size, num_samples, progress)

    # Reference: stored ADM mu/sigma for FID when they are Inception's; features only if needed.
    ref_stats, fid_ref, fid_ref_origin = None, None, None
    if isinstance(ref_in, Stats):
        notes += check_compatible(ref_in, ext, "reference")
        ref_stats = fid_ref = ref_in
        fid_ref_origin = "statistics file"
    elif ref_in is not None:
        stored = ref_in.stored_stats
        if "fid" in metrics and stored is not None and ext.name == "inception" and stored[0].shape == (ext.feature_dim,):
            fid_ref = Stats(stored[0], stored[1], ref_in.num_images, meta={"source": ref_in.name})
            fid_ref_origin = "stored mu/sigma of the reference batch"
            notes.append(f"FID uses the mu/sigma stored in {ref_in.name} (made by ADM's TensorFlow Inception)")
        if fid_ref is None or "kid" in metrics or "prc" in metrics:
            ref_stats = (cached_stats(ref_in, ext, cache_dir, batch_size, progress) if use_cache
                         else compute_stats(ref_in, ext, batch_size, progress=progress))
        if fid_ref is None:
            fid_ref, fid_ref_origin = ref_stats, "features of the reference images"

    values: dict[str, float] = {}
    settings: dict[str, object] = {"seed": seed}
    if "fid" in metrics:
        values["fid"] = frechet_distance(sample_stats.mu, sample_stats.sigma, fid_ref.mu, fid_ref.sigma)
    if "isc" in metrics:
        values["isc_mean"], values["isc_std"] = inception_score(
            _require(sample_stats, "logits", "IS", "samples"), isc_splits, seed)
        settings["isc_splits"] = isc_splits
    if "kid" in metrics:
        values["kid_mean"], values["kid_std"], used = kernel_inception_distance(
            _require(sample_stats, "features", "KID", "samples"), _require(ref_stats, "features", "KID", "reference"),
            kid_subsets, kid_subset_size, seed)
        settings.update(kid_subsets=kid_subsets, kid_subset_size=used)
    if "prc" in metrics:
        values["precision"], values["recall"] = precision_recall(
            _require(sample_stats, "features", "precision/recall", "samples"),
            _require(ref_stats, "features", "precision/recall", "reference"), prc_k, device=ext.device)
        settings["prc_k"] = prc_k

    # Classifier agreement: how often the digits classifier reads the class the sampler was asked for.
    labels = getattr(sample_in, "labels", None)
    if ext.name == "digits" and labels is not None and sample_stats.logits is not None:
        predicted = sample_stats.logits.argmax(axis=1)
        labels = labels[:len(predicted)]
        values["class_agreement"] = float((predicted == labels).mean())
        per_class = {int(c): float((predicted[labels == c] == c).mean()) for c in np.unique(labels)}
    else:
        per_class = None

    if ext.name == "inception" and "fid" in metrics and sample_stats.num_images < FULL_FID_SAMPLES:
        notes.append(f"FID from {sample_stats.num_images} samples is biased upward against FID-50K; "
                     f"report it as FID-{sample_stats.num_images / 1000:g}K")
    report = {
        "metrics": values,
        "samples": {"source": sample_stats.meta.get("source", str(samples)), "num_images": sample_stats.num_images},
        "ref": None if not needs_ref else {
            "source": (ref_stats or fid_ref).meta.get("source", str(ref)),
            "num_images": (ref_stats or fid_ref).num_images,
            "fid_statistics": fid_ref_origin,
            "cache": (ref_stats.meta.get("cache") if ref_stats is not None else None),
        },
        "extractor": ext.describe(),
        "settings": settings,
        "versions": _versions(),
        "notes": notes,
    }
    if per_class is not None:
        report["class_agreement_per_class"] = per_class
    return report


def _versions() -> dict:
    import torch
    import torch_fidelity

    return {"torch_fidelity": torch_fidelity.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def format_table(report: dict) -> str:
    """The report as a small human-readable table, with the notes under it."""
    m, s, ref = report["metrics"], report["settings"], report["ref"]
    head = f"fid_eval | extractor {report['extractor']['name']} | samples {report['samples']['source']} " \
           f"({report['samples']['num_images']} images)"
    if ref is not None:
        head += f" | reference {ref['source']} ({ref['num_images']} images)"
    rows = []
    if "fid" in m:
        rows.append(("FID", f"{m['fid']:.4f}"))
    if "isc_mean" in m:
        rows.append((f"IS ({s['isc_splits']} splits)", f"{m['isc_mean']:.4f} ± {m['isc_std']:.4f}"))
    if "kid_mean" in m:
        rows.append((f"KID ({s['kid_subsets']} x {s['kid_subset_size']})", f"{m['kid_mean']:.6f} ± {m['kid_std']:.6f}"))
    if "precision" in m:
        rows.append((f"precision (k={s['prc_k']})", f"{m['precision']:.4f}"))
        rows.append((f"recall (k={s['prc_k']})", f"{m['recall']:.4f}"))
    if "class_agreement" in m:
        rows.append(("class agreement", f"{m['class_agreement']:.4f}"))
    width = max(len(r[0]) for r in rows) + 2
    lines = [head, f"  {'metric':<{width}}value"] + [f"  {k:<{width}}{v}" for k, v in rows]
    lines += [f"note: {n}" for n in report["notes"] if n]
    return "\n".join(lines)


