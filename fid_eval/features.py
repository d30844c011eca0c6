"""What a feature extractor is: a frozen network, images -> Features (features for FID/KID/P&R, logits
for IS, spatial features for sFID), named by a fingerprint.

An extractor's `fingerprint` names the network and the exact weights: "<its prefix><first 16 hex digits
of its weights' sha256>". Statistics carry it, and statistics made by another fingerprint are refused, so
numbers from different evaluators are never mixed. The extractors: fid_eval.inception, fid_eval.digits;
their registry: fid_eval.extractors.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from fid_eval.errors import FidEvalError


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_device(device: str | None) -> torch.device:
    """`device` ("cpu", "cuda", "cuda:1", None = cuda when available) as a usable torch.device."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise FidEvalError(f"unknown device {device!r}; expected cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FidEvalError(f"device {device!r} requested but CUDA is not available here; use --device cpu")
    return dev


class Features(NamedTuple):
    """What an extractor gives for a batch of B images (float32 arrays)."""

    features: np.ndarray              # (B, D): FID, KID, precision/recall
    logits: np.ndarray                # (B, K): IS, class agreement
    spatial: np.ndarray | None = None  # (B, S): sFID; None when the network has no spatial features


class Extractor:
    """A frozen network in eval mode. Subclasses set the attributes and implement `_forward`."""

    name: str             # "inception" | "digits"
    fingerprint_prefix: str  # the network's part of the fingerprint
    fingerprint: str      # network + weights digest: what statistics must agree on
    weights_path: str
    feature_dim: int
    num_classes: int      # width of the logits used for IS
    spatial_dim: int | None = None  # width of the spatial features (sFID), None when there are none
    note: str = ""        # how comparable its numbers are, printed under the table

    def __init__(self, device: torch.device):
        self.device = device

    def _identify_weights(self, path: Path) -> None:
        """Record the weights file the network was loaded from: its path, sha256 and the fingerprint."""
        self.weights_path, self.sha256 = str(path), sha256_file(path)
        self.fingerprint = f"{self.fingerprint_prefix}{self.sha256[:16]}"

    def _forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """uint8 (B, 3, H, W) on self.device -> features (B, D), logits (B, K)[, spatial (B, S)]."""
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> Features:
        """uint8 (B, H, W, 3) -> float32 Features of the batch."""
        x = torch.from_numpy(np.array(images)).to(self.device).permute(0, 3, 1, 2)  # (B, 3, H, W), copied
        out = [t.float().cpu().numpy() for t in self._forward(x)]
        return Features(*out)

    def describe(self) -> dict:
        return {"name": self.name, "fingerprint": self.fingerprint, "weights": self.weights_path,
                "feature_dim": self.feature_dim, "spatial_dim": self.spatial_dim, "dtype": "float32",
                "note": self.note}
