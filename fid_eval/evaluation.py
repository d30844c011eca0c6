"""Samples + reference -> metrics report (a dict that is the JSON output) and its table.

`evaluate` runs four stages: inputs (opened, checked, what to featurise decided) -> statistics ->
metrics (from the statistics alone) -> report. It featurises only what the requested metrics need: FID
needs (mu, sigma) of both sides, sFID (mu_s, sigma_s), IS the samples' logits, KID and precision/recall
the features of both sides. The reference is cached by content hash. An ADM batch's stored Inception
statistics (mu/sigma, mu_s/sigma_s) serve FID and sFID when present, on either side, as ADM's evaluator
reads them. Two statistics files need no network at all: FID and sFID are arithmetic on them.
The report names the protocol, the extractor's fingerprint (network + weights hash) and the counts, and
lists warnings for comparisons that mislead; a NaN or inf anywhere is an error, never a number.
"""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class Settings:
    """What fixes the numbers besides the images and the network: the metrics and the protocol's choices."""

    metrics: tuple[str, ...]
    protocol: str                      # "adm" | "torch-fidelity"
    num_samples: int | None = None     # score the first num_samples samples only
    isc_splits: int | None = None      # torch-fidelity protocol only (default 10)
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    prc_k: int = ADM_PRC_K
    seed: int = DEFAULT_SEED

    def __post_init__(self):
        """One error naming the first setting out of range, or a setting the protocol fixes otherwise."""
        for flag, value, low in (("--num-samples", self.num_samples, 1), ("--isc-splits", self.isc_splits, 1),
                                 ("--kid-subsets", self.kid_subsets, 1),
                                 ("--kid-subset-size", self.kid_subset_size, 2), ("--prc-k", self.prc_k, 1)):
            if value is not None and value < low:
                raise FidEvalError(f"{flag} must be >= {low}, got {value}")
        if self.protocol == "adm" and self.isc_splits is not None:
            raise FidEvalError(f"--isc-splits {self.isc_splits} is torch-fidelity's protocol; ADM's IS uses "
                               f"consecutive splits of {ADM_ISC_SPLIT_SIZE:,} samples (pass --protocol torch-fidelity)")
        if self.protocol == "adm" and self.prc_k != ADM_PRC_K:
            raise FidEvalError(f"--prc-k {self.prc_k}: ADM's precision/recall uses k = {ADM_PRC_K} "
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


def comparison_warnings(metrics: tuple[str, ...], stats: Statistics) -> list[str]:
    """Comparisons that pass the checks but mislead: too few images for the covariance, mixed image sizes."""
    warnings = []
    for metric, field, pair in (("fid", "mu", stats.fid), ("sfid", "mu_s", stats.sfid)):
        if metric not in metrics:
            continue
        dim = getattr(pair["samples"], field).shape[0]
        for role in ROLES:
            n = pair[role].num_images
            if 0 < n < dim:
                warnings.append(f"{metric.upper()}: the {role} hold {n} images, fewer than the {dim} feature "
                                f"dimensions: the covariance is singular and {metric.upper()} is not comparable "
                                f"with one from >= {dim} images (usually lower)")
    sample, ref = stats.own["samples"], stats.own["reference"]
    if ref is not None and sample.image_size and ref.image_size and sample.image_size != ref.image_size:
        warnings.append(f"samples are {_size(sample.image_size)} images but the reference is {_size(ref.image_size)}: "
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
    """Score `samples` against `ref`; returns the report (metrics, inputs, extractor, settings, notes, warnings).

    Four stages: the inputs (opened and checked, what must be featurised decided), their statistics
    (features, stored or files), the metrics from those statistics alone, the report.
    """
    if isinstance(extractor, str) and extractor not in EXTRACTORS:
        raise FidEvalError(f"unknown extractor {extractor!r}; expected one of {', '.join(EXTRACTORS)}")
    ext_name = extractor.name if isinstance(extractor, Extractor) else extractor
    if metrics is None:  # sFID needs spatial features: Inception's
        spatial = extractor.spatial_dim if isinstance(extractor, Extractor) else ext_name in (None, "inception")
        metrics = [m for m in METRICS if m != "sfid" or spatial]
    settings = Settings(tuple(parse_metrics(metrics)), resolve_protocol(protocol, ext_name), num_samples,
                        isc_splits, kid_subsets, kid_subset_size, prc_k, seed)
    inputs = open_inputs(samples, ref, settings, extractor, weights, device, workers)
    stats = compute_statistics(inputs, settings, batch_size, cache_dir, use_cache, progress)
    values, used = compute_metrics(stats, settings, inputs.extractor.device if inputs.extractor else "cpu")
    per_class = class_agreement(inputs, stats, values)
    return make_report(inputs, stats, settings, values, used, per_class, (samples, ref))


# ---------------------------------------------------------------------------------------------
# Stage 1: inputs

ROLES = ("samples", "reference")


@dataclasses.dataclass
class Inputs:
    """What is compared, which images go through the network, and the network."""

    sources: dict[str, ImageSource | Stats | None]  # by role; reference None when no metric needs one
    stored: dict[str, Stats | None]      # by role: the Inception statistics an ADM batch carries, if used
    featurise: dict[str, bool]           # by role: whether its images are featurised
    extractor: Extractor | None          # None when nothing is featurised and none was given
    extractor_name: str | None


def needs_features(metrics: tuple[str, ...], role: str, stored: Stats | None) -> bool:
    """Whether a side's images must be featurised: IS needs the samples' logits, KID and P/R both sides'
    features, FID and sFID only what the batch does not store (sFID: mu_s/sigma_s)."""
    wanted = {"isc", "kid", "prc"} if role == "samples" else {"kid", "prc"}
    return bool(wanted & set(metrics)) or ("fid" in metrics and stored is None) or (
        "sfid" in metrics and (stored is None or stored.mu_s is None))


def open_inputs(samples, ref, settings: Settings, extractor: str | Extractor | None, weights: str | None,
                device: str | None, workers: int | None) -> Inputs:
    """Open and check both inputs, decide what is featurised, and build the extractor when needed.

    An ADM batch's stored Inception statistics (`mu`, `sigma`, `mu_s`, `sigma_s`) serve FID and sFID, on
    either side, as ADM's evaluator reads them: the samples' only when all of them are scored.
    """
    ext_name = extractor.name if isinstance(extractor, Extractor) else extractor
    needs_ref = bool({"fid", "sfid", "kid", "prc"} & set(settings.metrics))
    if needs_ref and ref is None:
        raise FidEvalError(f"metrics {list(settings.metrics)} need a reference: pass --ref")
    sources = {"samples": open_input(samples, workers), "reference": open_input(ref, workers) if needs_ref else None}
    sample_in, n = sources["samples"], settings.num_samples
    if isinstance(sample_in, Stats) and n is not None:
        raise FidEvalError("--num-samples selects images to featurise; the samples given are statistics")
    if isinstance(sample_in, ImageSource) and n is not None and n > sample_in.num_images:
        raise FidEvalError(f"--num-samples {n}, but {sample_in.name} holds {sample_in.num_images} images")
    inception = ext_name in (None, "inception")
    stored = {role: stored_stats(src) if inception and isinstance(src, ImageSource) else None
              for role, src in sources.items()}
    if n is not None and n < sample_in.num_images:
        stored["samples"] = None  # they describe all the samples, not the first n
    featurise = {role: isinstance(src, ImageSource) and needs_features(settings.metrics, role, stored[role])
                 for role, src in sources.items()}
    ext = extractor if isinstance(extractor, Extractor) else (
        build_extractor(ext_name or "inception", weights, device) if any(featurise.values()) else None)
    if "sfid" in settings.metrics and ext is not None and ext.spatial_dim is None:
        raise FidEvalError(f"sFID needs the samples' spatial statistics, and the {ext.name} extractor has no "
                           "spatial features: sFID is defined on Inception's mixed_6/conv (--extractor inception)")
    return Inputs(sources, stored, featurise, ext, ext_name)


# ---------------------------------------------------------------------------------------------
# Stage 2: statistics

@dataclasses.dataclass
class Statistics:
    """Each side's statistics and those each metric compares, where they came from, and notes."""

    own: dict[str, Stats | None]        # by role: features/logits of its images, or its statistics file
    fid: dict[str, Stats | None]        # by role: whose mu/sigma FID compares
    sfid: dict[str, Stats | None]       # by role: whose mu_s/sigma_s sFID compares
    origin: dict[str, dict[str, str]]   # by role: {"fid": ..., "sfid": ...} in words
    fingerprint: str | None
    notes: list[str]


def side_statistics(role: str, inputs: Inputs, settings: Settings, batch_size: int, cache_dir, use_cache: bool,
                    progress: bool) -> tuple[Stats | None, dict[str, Stats | None], dict[str, str]]:
    """One side: (its own statistics, {metric: statistics FID/sFID use}, {metric: their origin})."""
    source, stored, whose = inputs.sources[role], inputs.stored[role], "sample" if role == "samples" else "reference"
    if not isinstance(source, ImageSource):  # a statistics file, or no reference needed
        return source, {"fid": source, "sfid": source}, dict.fromkeys(("fid", "sfid"), "statistics file")
    own = None
    if inputs.featurise[role] and role == "samples":  # never cached: samples change every run
        own = compute_stats(source, inputs.extractor, batch_size, settings.num_samples, progress)
    elif inputs.featurise[role]:
        own = (cached_stats(source, inputs.extractor, cache_dir, batch_size, progress) if use_cache
               else compute_stats(source, inputs.extractor, batch_size, progress=progress))
    used, origin = {}, {}
    for metric, fields in (("fid", "mu/sigma"), ("sfid", "mu_s/sigma_s")):
        if stored is not None and metric in settings.metrics and (metric == "fid" or stored.mu_s is not None):
            used[metric], origin[metric] = stored, f"stored {fields} of the {whose} batch"
        else:
            used[metric], origin[metric] = own, f"features of the {whose} images"
    return own, used, origin


def compute_statistics(inputs: Inputs, settings: Settings, batch_size: int, cache_dir, use_cache: bool,
                       progress: bool) -> Statistics:
    """Featurise what must be, take stored statistics and files as they are, and check they agree."""
    ext = inputs.extractor
    own, fid, sfid, origin, files = {}, {}, {}, {}, []
    notes = [ext.note] if ext else []
    for role in ROLES:
        own[role], used, origin[role] = side_statistics(role, inputs, settings, batch_size, cache_dir, use_cache,
                                                        progress)
        fid[role], sfid[role] = used["fid"], used["sfid"]
        source = inputs.sources[role]
        if isinstance(source, Stats):
            files.append((role, source))
        stored_for = [name for metric, name in (("fid", "FID"), ("sfid", "sFID"))
                      if inputs.stored[role] is not None and used[metric] is inputs.stored[role]]
        if stored_for:
            files.append((role, inputs.stored[role]))
            made = ("made by ADM's TensorFlow Inception" if role == "reference" else
                    "the sample batch's own, read as ADM's evaluator reads them")
            notes.append(f"{' and '.join(stored_for)} use the statistics stored in {source.name} ({made})")
        if own[role] is None:  # not featurised: its stored statistics stand for it
            own[role] = fid[role] if fid[role] is not None else sfid[role]
    if ext is not None:
        for role, stats in files:
            notes += check_compatible(stats, ext, role)
        fingerprint = ext.fingerprint
    else:
        fingerprint, more = agree_without_network(files, inputs.extractor_name)
        notes += more + ["no images were featurised: metrics computed from the statistics alone"]
    return Statistics(own, fid, sfid, origin, fingerprint, notes)


# ---------------------------------------------------------------------------------------------
# Stage 3: metrics, from the statistics alone

def compute_metrics(stats: Statistics, settings: Settings, device) -> tuple[dict[str, float], dict[str, object]]:
    """(metric values, the settings they used). Precision/recall distances: float16 under ADM's protocol."""
    m, sample, ref = settings.metrics, stats.own["samples"], stats.own["reference"]
    values: dict[str, float] = {}
    used: dict[str, object] = {"seed": settings.seed}
    if "fid" in m:
        s, r = stats.fid["samples"], stats.fid["reference"]
        values["fid"] = frechet_distance(s.mu, s.sigma, r.mu, r.sigma)
    if "sfid" in m:
        s, r = stats.sfid["samples"], stats.sfid["reference"]
        values["sfid"] = frechet_distance(_require(s, "mu_s", "sFID", "samples"), s.sigma_s,
                                          _require(r, "mu_s", "sFID", "reference"), r.sigma_s)
    if "isc" in m and settings.protocol == "adm":
        logits = _require(sample, "logits", "IS", "samples")
        values["isc_mean"], values["isc_std"] = inception_score(logits, split_size=ADM_ISC_SPLIT_SIZE)
        used["isc_split_size"] = ADM_ISC_SPLIT_SIZE
    elif "isc" in m:
        used["isc_splits"] = settings.isc_splits or TORCH_FIDELITY_ISC_SPLITS
        values["isc_mean"], values["isc_std"] = inception_score(
            _require(sample, "logits", "IS", "samples"), used["isc_splits"], settings.seed)
    if "kid" in m:
        values["kid_mean"], values["kid_std"], size = kernel_inception_distance(
            _require(sample, "features", "KID", "samples"), _require(ref, "features", "KID", "reference"),
            settings.kid_subsets, settings.kid_subset_size, settings.seed)
        used.update(kid_subsets=settings.kid_subsets, kid_subset_size=size)
    if "prc" in m:
        used.update(prc_k=settings.prc_k, prc_distances="float16" if settings.protocol == "adm" else "float32")
        values["precision"], values["recall"] = precision_recall(
            _require(sample, "features", "precision/recall", "samples"),
            _require(ref, "features", "precision/recall", "reference"), settings.prc_k, device=device,
            float16=settings.protocol == "adm")
    return values, used


def class_agreement(inputs: Inputs, stats: Statistics, values: dict[str, float]) -> dict[int, float] | None:
    """How often the digits classifier reads the class the sampler was asked for: added to `values`
    (overall), returned per class; None when the samples carry no labels or another network scores them."""
    ext, source, logits = inputs.extractor, inputs.sources["samples"], stats.own["samples"].logits
    labels = getattr(source, "labels", None)
    if ext is None or ext.name != "digits" or labels is None or logits is None:
        return None
    predicted = logits.argmax(axis=1)
    labels = labels[:len(predicted)]
    if labels.min() < 0 or labels.max() >= ext.num_classes:
        raise FidEvalError(f"{source.name}: labels (arr_1) must be class ids 0..{ext.num_classes - 1} of the "
                           f"{ext.name} classifier, got {labels.min()}..{labels.max()}")
    values["class_agreement"] = float((predicted == labels).mean())
    return {int(c): float((predicted[labels == c] == c).mean()) for c in np.unique(labels)}


# ---------------------------------------------------------------------------------------------
# Stage 4: the report

def _side_report(role: str, stats: Statistics, metrics: tuple[str, ...], given) -> dict:
    own = stats.own[role]
    return {
        "source": own.meta.get("source", str(given)), "num_images": own.num_images,
        "image_size": list(own.image_size) if own.image_size else None,
        "fid_statistics": stats.origin[role]["fid"] if "fid" in metrics else None,
        "sfid_statistics": stats.origin[role]["sfid"] if "sfid" in metrics else None,
    }


def make_report(inputs: Inputs, stats: Statistics, settings: Settings, values: dict[str, float],
                used: dict[str, object], per_class: dict[int, float] | None, given: tuple) -> dict:
    """The report: strict JSON naming the protocol, the network, the inputs, notes and warnings."""
    for name, value in values.items():
        check_finite(name, value)
    m, ext, n, notes = settings.metrics, inputs.extractor, stats.own["samples"].num_images, list(stats.notes)
    if (ext is None or ext.name == "inception") and n < FULL_FID_SAMPLES and {"fid", "sfid"} & set(m):
        notes.append(f"FID from {n} samples is biased upward against FID-50K; report it as FID-{n / 1000:g}K")
    ref = None
    if inputs.sources["reference"] is not None:
        ref = _side_report("reference", stats, m, given[1])
        ref["cache"] = stats.own["reference"].meta.get("cache") if inputs.featurise["reference"] else None
    report = {
        "protocol": settings.protocol,
        "metrics": values,
        "samples": _side_report("samples", stats, m, given[0]),
        "ref": ref,
        "extractor": ext.describe() if ext is not None else {
            "name": extractor_of(stats.fingerprint) if stats.fingerprint else "inception",
            "fingerprint": stats.fingerprint, "weights": None,
            "note": "from the statistics files' records; no network was run"},
        "settings": used,
        "versions": _versions(),
        "notes": notes,
        "warnings": comparison_warnings(m, stats),
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
