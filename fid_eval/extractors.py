"""The extractor registry: "inception" (torch-fidelity's inception-v3-compat, the network behind published
ImageNet FIDs) and "digits" (our small classifier for the embedded digits demo), built by name.
"""

from __future__ import annotations

from fid_eval.digits import DigitsExtractor
from fid_eval.errors import FidEvalError
from fid_eval.features import Extractor, resolve_device
from fid_eval.inception import InceptionExtractor

_CLASSES: dict[str, type[Extractor]] = {"inception": InceptionExtractor, "digits": DigitsExtractor}
EXTRACTORS = tuple(_CLASSES)


def extractor_of(fingerprint: str) -> str | None:
    """The extractor name a statistics fingerprint belongs to (None when unknown)."""
    return next((name for name, cls in _CLASSES.items() if fingerprint.startswith(cls.fingerprint_prefix)), None)


def build_extractor(name: str, weights: str | None = None, device: str | None = None) -> Extractor:
    """The extractor `name` with weights from `weights` (its default location when None) on `device`."""
    if name not in _CLASSES:
        raise FidEvalError(f"unknown extractor {name!r}; expected one of {', '.join(EXTRACTORS)}")
    return _CLASSES[name](weights, resolve_device(device))
