"""Samples + reference -> metrics report (a dict that is the JSON output) and its table.

Featurises only what the requested metrics need: FID needs (mu, sigma) of both sides, sFID (mu_s,
sigma_s), IS the samples' logits, KID and precision/recall the features of both sides. The reference is
cached by content hash; an ADM reference batch's stored Inception statistics are used for FID and sFID
when present. Two statistics files need no network at all: FID and sFID are arithmetic on them.
The report names the protocol, the extractor's fingerprint (network + weights hash) and the counts, and
lists warnings for comparisons that mislead; a NaN or inf anywhere is an error, never a number.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import numpy as np

from fid_eval.errors import FidEvalError
from fid_eval.extractors import EXTRACTORS, build_extractor, extractor_of
from fid_eval.features import Extractor
from fid_eval.inputs import ImageSource, is_stats_file, open_images
from fid_eval.metrics import (
    ADM_ISC_SPLIT_SIZE,
    DEFAULT_SEED,
    check_finite,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)
from fid_eval.stats import Stats, cached_stats, compute_stats, load_stats, stored_stats

METRICS = ("fid", "sfid", "isc", "kid", "prc")
PROTOCOLS = ("adm", "torch-fidelity")
FULL_FID_SAMPLES = 50_000
TORCH_FIDELITY_ISC_SPLITS = 10
ADM_PRC_K = 3


def parse_metrics(metrics: str | list[str] | tuple[str, ...]) -> list[str]:
    """"fid,isc" or ["fid", "isc"] -> validated list in canonical order."""
    names = [m.strip().lower() for m in (metrics.split(",") if isinstance(metrics, str) else metrics) if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise FidEvalError(f"unknown metrics {unknown or names}; expected a comma list of {', '.join(METRICS)}")
    return [m for m in METRICS if m in names]


def resolve_protocol(protocol: str | None, extractor_name: str | None) -> str:
    """`protocol`, or the default: ADM's for Inception features, torch-fidelity's for any other network."""
    if protocol is None:
        return "adm" if extractor_name in (None, "inception") else "torch-fidelity"
    if protocol not in PROTOCOLS:
        raise FidEvalError(f"unknown protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    return protocol


def check_settings(protocol: str, num_samples: int | None, isc_splits: int | None, kid_subsets: int,
                   kid_subset_size: int, prc_k: int) -> None:
    """One error naming the first setting out of range, or a setting the protocol fixes otherwise."""
    for flag, value, low in (("--num-samples", num_samples, 1), ("--isc-splits", isc_splits, 1),
                             ("--kid-subsets", kid_subsets, 1), ("--kid-subset-size", kid_subset_size, 2),
                             ("--prc-k", prc_k, 1)):
        if value is not None and value < low:
            raise FidEvalError(f"{flag} must be >= {low}, got {value}")
    if protocol == "adm" and isc_splits is not None:
        raise FidEvalError(f"--isc-splits {isc_splits} is torch-fidelity's protocol; ADM's IS uses consecutive "
                           f"splits of {ADM_ISC_SPLIT_SIZE:,} samples (pass --protocol torch-fidelity)")
    if protocol == "adm" and prc_k != ADM_PRC_K:
        raise FidEvalError(f"--prc-k {prc_k}: ADM's precision/recall uses k = {ADM_PRC_K} "
                           "(pass --protocol torch-fidelity for another k)")


def open_input(spec: str | Path | ImageSource | Stats, workers: int | None = None) -> ImageSource | Stats:
    """A CLI input: digits:<split>, an image folder, an ADM .npz, or a statistics .npz/.pt."""
    if isinstance(spec, (ImageSource, Stats)):
        return spec
    path = Path(str(spec)).expanduser()
    if path.is_file() and is_stats_file(path):
        return load_stats(path)
    return open_images(str(spec), workers)


def _foreign_note(role: str, source: str) -> str:
    return (f"{role} statistics {source} carry no extractor record; assumed Inception pool3 (and spatial) "
            "statistics (ADM / pytorch-fid)")


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
        return [_foreign_note(role, name)]
    if stats.fingerprint != extractor.fingerprint:
        raise FidEvalError(f"{role} statistics {name} were made by {stats.fingerprint}, not by {extractor.fingerprint} "
                           f"(the extractor/weights in use): recompute them with the same --extractor and --weights")
    return []


def agree_without_network(files: list[tuple[str, Stats]], name: str | None) -> tuple[str | None, list[str]]:
    """The fingerprint shared by statistics compared with no extractor built, or an error; plus notes.

    Fingerprints must be equal when both sides carry one. A side without one is taken as Inception pool3
    (and spatial) statistics, so the other side must be Inception's too; `name` (an --extractor given
    explicitly) must match them.
    """
    known = {role: s.fingerprint for role, s in files if s.fingerprint is not None}
    if len(set(known.values())) > 1:
        (r1, f1), (r2, f2) = list(known.items())[:2]
        raise FidEvalError(f"{r1} statistics were made by {f1} but {r2} statistics by {f2}: "
                           "numbers from different feature networks or weights cannot be compared")
    fingerprint = next(iter(known.values()), None)
    made_by = extractor_of(fingerprint) if fingerprint else "inception"
    notes = []
    for role, s in files:
        if s.fingerprint is None:
            if made_by != "inception":
                raise FidEvalError(f"{role} statistics {s.meta.get('source', role)} carry no extractor record, "
                                   f"so they are taken as Inception's, but the other side was made by {fingerprint}")
            notes.append(_foreign_note(role, s.meta.get("source", role)))
    if name is not None and made_by != name:
        raise FidEvalError(f"--extractor {name}, but the statistics were made by {fingerprint or 'Inception'}")
    return fingerprint, notes


def _require(stats: Stats, field: str, metric: str, role: str) -> np.ndarray:
    value = getattr(stats, field)
    whose = "samples'" if role == "samples" else f"{role}'s"
    if value is None and field == "mu_s":
        raise FidEvalError(f"sFID needs the {whose} spatial statistics (mu_s/sigma_s), but "
                           f"{stats.meta.get('source', role)} has none: sFID is defined on Inception's "
                           "mixed_6/conv features, from images or statistics that hold them")
    if value is None:
        raise FidEvalError(f"{metric} needs the {whose} {field}, but {stats.meta.get('source', role)} holds only "
                           f"mu/sigma: pass the images, or statistics made by `python -m fid_eval stats`")
    return value


def _size(value) -> str:
    return "x".join(str(v) for v in reversed(value)) if value else "?"  # (H, W) -> "WxH"


def comparison_warnings(metrics: list[str], sample: Stats, fid_ref: Stats | None, sfid_ref: Stats | None,
                        ref_size: tuple[int, int] | None) -> list[str]:
    """Comparisons that pass the checks but mislead: too few images for the covariance, mixed image sizes."""
    warnings = []
    for metric, field, ref in (("fid", "mu", fid_ref), ("sfid", "mu_s", sfid_ref)):
        if metric not in metrics or ref is None:
            continue
        dim = getattr(sample, field).shape[0]
        for role, stats in (("samples", sample), ("reference", ref)):
            if 0 < stats.num_images < dim:
                warnings.append(f"{metric.upper()}: the {role} hold {stats.num_images} images, fewer than the {dim} "
                                f"feature dimensions: the covariance is singular and {metric.upper()} is not comparable "
                                f"with one from >= {dim} images (usually lower)")
    if sample.image_size and ref_size and tuple(sample.image_size) != tuple(ref_size):
        warnings.append(f"samples are {_size(sample.image_size)} images but the reference is {_size(ref_size)}: "
                        "the extractor resizes both, but the numbers compare different resolutions")
    return warnings


def evaluate(samples: str | Path | ImageSource | Stats,
             ref: str | Path | ImageSource | Stats | None,
             metrics: str | list[str] | None = None,  # default: all, sFID only for Inception
             extractor: str | Extractor | None = None,  # "inception" when images are featurised and None
             weights: str | None = None,          # extractor weights file; its default location when None
             batch_size: int = 64,
             device: str | None = None,           # cuda when available when None
             cache_dir: str | Path | None = None,  # reference statistics cache; default_cache_dir() when None
             use_cache: bool = True,
             num_samples: int | None = None,      # score the first num_samples samples only
             isc_splits: int | None = None,       # torch-fidelity protocol only (default 10)
             kid_subsets: int = 100,
             kid_subset_size: int = 1000,
             prc_k: int = 3,
             seed: int = DEFAULT_SEED,
             workers: int | None = None,          # image decoding threads for folders
             progress: bool = True,
             protocol: str | None = None,         # "adm" | "torch-fidelity"; ADM's for Inception when None
             ) -> dict:
    """Score `samples` against `ref`; returns the report (metrics, inputs, extractor, settings, notes, warnings)."""
    if isinstance(extractor, str) and extractor not in EXTRACTORS:
        raise FidEvalError(f"unknown extractor {extractor!r}; expected one of {', '.join(EXTRACTORS)}")
    ext_name = extractor.name if isinstance(extractor, Extractor) else extractor
    if metrics is None:  # sFID needs spatial features: Inception's
        spatial = extractor.spatial_dim if isinstance(extractor, Extractor) else ext_name in (None, "inception")
        metrics = [m for m in METRICS if m != "sfid" or spatial]
    metrics = parse_metrics(metrics)
    protocol = resolve_protocol(protocol, ext_name)
    check_settings(protocol, num_samples, isc_splits, kid_subsets, kid_subset_size, prc_k)
    needs_ref = any(m in metrics for m in ("fid", "sfid", "kid", "prc"))
    if needs_ref and ref is None:
        raise FidEvalError(f"metrics {metrics} need a reference: pass --ref")
    sample_in = open_input(samples, workers)
    ref_in = open_input(ref, workers) if needs_ref else None
    if isinstance(sample_in, Stats) and num_samples is not None:
        raise FidEvalError("--num-samples selects images to featurise; the samples given are statistics")
    if isinstance(sample_in, ImageSource) and num_samples is not None and num_samples > sample_in.num_images:
        raise FidEvalError(f"--num-samples {num_samples}, but {sample_in.name} holds {sample_in.num_images} images")

    # An ADM batch's stored statistics serve FID/sFID when the features are Inception's.
    stored = stored_stats(ref_in) if isinstance(ref_in, ImageSource) and ext_name in (None, "inception") else None
    ref_featurise = isinstance(ref_in, ImageSource) and (
        "kid" in metrics or "prc" in metrics or ("fid" in metrics and stored is None)
        or ("sfid" in metrics and (stored is None or stored.mu_s is None)))
    ext = None
    if isinstance(extractor, Extractor):
        ext = extractor
    elif isinstance(sample_in, ImageSource) or ref_featurise:
        ext = build_extractor(ext_name or "inception", weights, device)
    if "sfid" in metrics and ext is not None and ext.spatial_dim is None:
        raise FidEvalError(f"sFID needs the samples' spatial statistics, and the {ext.name} extractor has no "
                           "spatial features: sFID is defined on Inception's mixed_6/conv (--extractor inception)")
    notes, files = ([ext.note] if ext else []), []

    # Samples: features from images (never cached: they change every run), or a statistics file.
    if isinstance(sample_in, Stats):
        files.append(("samples", sample_in))
        sample_stats = sample_in
    else:
        sample_stats = compute_stats(sample_in, ext, batch_size, num_samples, progress)

    # Reference: a statistics file, or images (cached) with the batch's stored statistics for FID/sFID.
    ref_stats = fid_ref = sfid_ref = None
    origin = {}
    if isinstance(ref_in, Stats):
        files.append(("reference", ref_in))
        ref_stats = fid_ref = sfid_ref = ref_in
        origin = {"fid": "statistics file", "sfid": "statistics file"}
    elif ref_in is not None:
        if ref_featurise:
            ref_stats = (cached_stats(ref_in, ext, cache_dir, batch_size, progress) if use_cache
                         else compute_stats(ref_in, ext, batch_size, progress=progress))
        fid_ref = sfid_ref = ref_stats
        origin = {"fid": "features of the reference images", "sfid": "features of the reference images"}
        used = []
        if stored is not None and "fid" in metrics:
            fid_ref, origin["fid"] = stored, "stored mu/sigma of the reference batch"
            used.append("FID")
        if stored is not None and "sfid" in metrics and stored.mu_s is not None:
            sfid_ref, origin["sfid"] = stored, "stored mu_s/sigma_s of the reference batch"
            used.append("sFID")
        if used:
            files.append(("reference", stored))
            notes.append(f"{' and '.join(used)} use the statistics stored in {ref_in.name} "
                         "(made by ADM's TensorFlow Inception)")

    if ext is not None:
        for role, stats in files:
            notes += check_compatible(stats, ext, role)
        fingerprint = ext.fingerprint
    else:
        fingerprint, more = agree_without_network(files, ext_name)
        notes += more + ["no images were featurised: metrics computed from the statistics alone"]

    values: dict[str, float] = {}
    settings: dict[str, object] = {"seed": seed}
    if "fid" in metrics:
        values["fid"] = frechet_distance(sample_stats.mu, sample_stats.sigma, fid_ref.mu, fid_ref.sigma)
    if "sfid" in metrics:
        values["sfid"] = frechet_distance(_require(sample_stats, "mu_s", "sFID", "samples"), sample_stats.sigma_s,
                                          _require(sfid_ref, "mu_s", "sFID", "reference"), sfid_ref.sigma_s)
    if "isc" in metrics:
        logits = _require(sample_stats, "logits", "IS", "samples")
        if protocol == "adm":
            values["isc_mean"], values["isc_std"] = inception_score(logits, split_size=ADM_ISC_SPLIT_SIZE)
            settings["isc_split_size"] = ADM_ISC_SPLIT_SIZE
        else:
            splits = isc_splits or TORCH_FIDELITY_ISC_SPLITS
            values["isc_mean"], values["isc_std"] = inception_score(logits, splits, seed)
            settings["isc_splits"] = splits
    if "kid" in metrics:
        values["kid_mean"], values["kid_std"], used = kernel_inception_distance(
            _require(sample_stats, "features", "KID", "samples"), _require(ref_stats, "features", "KID", "reference"),
            kid_subsets, kid_subset_size, seed)
        settings.update(kid_subsets=kid_subsets, kid_subset_size=used)
    if "prc" in metrics:
        values["precision"], values["recall"] = precision_recall(
            _require(sample_stats, "features", "precision/recall", "samples"),
            _require(ref_stats, "features", "precision/recall", "reference"), prc_k,
            device=ext.device if ext else "cpu")
        settings["prc_k"] = prc_k

    # Classifier agreement: how often the digits classifier reads the class the sampler was asked for.
    labels = getattr(sample_in, "labels", None)
    per_class = None
    if ext is not None and ext.name == "digits" and labels is not None and sample_stats.logits is not None:
        predicted = sample_stats.logits.argmax(axis=1)
        labels = labels[:len(predicted)]
        if labels.min() < 0 or labels.max() >= ext.num_classes:
            raise FidEvalError(f"{sample_in.name}: labels (arr_1) must be class ids 0..{ext.num_classes - 1} of the "
                               f"{ext.name} classifier, got {labels.min()}..{labels.max()}")
        values["class_agreement"] = float((predicted == labels).mean())
        per_class = {int(c): float((predicted[labels == c] == c).mean()) for c in np.unique(labels)}
    for name, value in values.items():
        check_finite(name, value)

    if (ext is None or ext.name == "inception") and sample_stats.num_images < FULL_FID_SAMPLES and (
            "fid" in metrics or "sfid" in metrics):
        notes.append(f"FID from {sample_stats.num_images} samples is biased upward against FID-50K; "
                     f"report it as FID-{sample_stats.num_images / 1000:g}K")
    ref_main = ref_stats or fid_ref or sfid_ref
    ref_size = (ref_in.image_size if isinstance(ref_in, ImageSource) else
                ref_main.image_size if ref_main is not None else None)
    warnings = comparison_warnings(metrics, sample_stats, fid_ref, sfid_ref, ref_size)
    report = {
        "protocol": protocol,
        "metrics": values,
        "samples": {"source": sample_stats.meta.get("source", str(samples)), "num_images": sample_stats.num_images,
                    "image_size": list(sample_stats.image_size) if sample_stats.image_size else None},
        "ref": None if not needs_ref else {
            "source": ref_in.name if isinstance(ref_in, ImageSource) else ref_main.meta.get("source", str(ref)),
            "num_images": ref_in.num_images if isinstance(ref_in, ImageSource) else ref_main.num_images,
            "image_size": list(ref_size) if ref_size else None,
            "fid_statistics": origin.get("fid") if "fid" in metrics else None,
            "sfid_statistics": origin.get("sfid") if "sfid" in metrics else None,
            "cache": (ref_stats.meta.get("cache") if ref_stats is not None else None),
        },
        "extractor": ext.describe() if ext is not None else {
            "name": extractor_of(fingerprint) if fingerprint else "inception", "fingerprint": fingerprint,
            "weights": None, "note": "from the statistics files' records; no network was run"},
        "settings": settings,
        "versions": _versions(),
        "notes": notes,
        "warnings": warnings,
    }
    if per_class is not None:
        report["class_agreement_per_class"] = per_class
    try:
        json.dumps(report, allow_nan=False)  # the report is strict JSON, or it is not a report
    except (TypeError, ValueError) as e:
        raise FidEvalError(f"the report is not strict JSON ({e})") from None
    return report


def print_warnings(report: dict, prog: str = "fid_eval") -> None:
    """Each warning of the report on stderr, one line each."""
    for warning in report.get("warnings", []):
        print(f"{prog}: warning: {warning}", file=sys.stderr)


def _versions() -> dict:
    import torch
    import torch_fidelity

    return {"torch_fidelity": torch_fidelity.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def format_table(report: dict) -> str:
    """The report as a small human-readable table, with the notes under it (warnings go to stderr)."""
    m, s, ref = report["metrics"], report["settings"], report["ref"]
    ext = report["extractor"]
    head = (f"fid_eval | protocol {report['protocol']} | {ext['name']} "
            f"{ext.get('fingerprint') or '(no fingerprint: assumed ADM Inception)'} | "
            f"samples {report['samples']['source']} ({report['samples']['num_images']} images)")
    if ref is not None:
        head += f" | reference {ref['source']} ({ref['num_images']} images)"
    rows = []
    if "fid" in m:
        rows.append(("FID", f"{m['fid']:.4f}"))
    if "sfid" in m:
        rows.append(("sFID", f"{m['sfid']:.4f}"))
    if "isc_mean" in m:
        split = (f"splits of {s['isc_split_size']:,}" if "isc_split_size" in s else f"{s['isc_splits']} splits")
        rows.append((f"IS ({split})", f"{m['isc_mean']:.4f} ± {m['isc_std']:.4f}"))
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
