"""The offline `digits` extractor: a small CNN trained on the embedded digits train split.

It lets `make demo` report FID / IS / KID / precision-recall with no download. Images are turned grey,
resized to 16x16 and fed to the classifier; its 64-d penultimate layer gives the features, its 10
logits give IS and `classify`. These numbers measure distance in this network's feature space only:
compare them with each other (runs scored by the same weights file), never with Inception FIDs.
Weights: fid_eval/weights/digits_cnn.pt, made by `python -m fid_eval.train_digits`.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fid_eval.digits_data import NUM_CLASSES
from fid_eval.errors import FidEvalError
from fid_eval.features import Extractor, resolve_device

DEFAULT_WEIGHTS = Path(__file__).parent / "weights" / "digits_cnn.pt"
INPUT_SIZE = 16


class DigitsCNN(nn.Module):
    """Grey 16x16 digit -> (features (N, feature_dim), logits (N, 10)); three 3x3 convs, two poolings."""

    def __init__(self, width: int = 16, feature_dim: int = 64, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),           # (N, w, 8, 8)
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (N, 2w, 4, 4)
            nn.Flatten(), nn.Linear(2 * width * (INPUT_SIZE // 4) ** 2, feature_dim), nn.ReLU(),
        )
        self.drop = nn.Dropout(0.2)  # training only; features are taken before it
        self.head = nn.Linear(feature_dim, num_classes)
        # Set after training so that E|f|^2 / D = 1 on the train split: keeps KID's cubic kernel
        # (x.y / D + 1)^3 in the range it has on Inception features, and FID on a fixed scale.
        self.register_buffer("feature_scale", torch.ones(()))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: (N, 1, 16, 16) in [-1, 1]
        hidden = self.body(x)                     # (N, 64), after ReLU: what the head sees
        return hidden * self.feature_scale, self.head(self.drop(hidden))  # (N, 64), (N, 10)


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W), any C and size -> float (N, 1, 16, 16) grey in [-1, 1]."""
    x = images.float().mean(dim=1, keepdim=True) / 255.0  # (N, 1, H, W) grey
    if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=True)
    return x * 2 - 1


def load_digits_cnn(path: str | Path | None = None, device: str | torch.device = "cpu") -> DigitsCNN:
    """DigitsCNN in eval mode with weights from `path` (the committed file when None)."""
    path = DEFAULT_WEIGHTS if path is None else Path(path).expanduser()
    if not path.is_file():
        raise FidEvalError(f"digits classifier weights not found at {path}; "
                           "train them with `python -m fid_eval.train_digits` or pass --weights PATH")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise FidEvalError(f"{path}: not a readable PyTorch weights file ({type(e).__name__})") from None
    net = DigitsCNN()
    try:
        net.load_state_dict(state_dict)
    except (RuntimeError, TypeError, AttributeError) as e:
        detail = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise FidEvalError(f"{path}: does not fit the digits classifier "
                           f"({detail[1] if len(detail) > 1 else detail[0] if detail else type(e).__name__})") from None
    return net.to(device).eval().requires_grad_(False)


class DigitsExtractor(Extractor):
    """Penultimate features (64-d) and logits (10) of the digits classifier."""

    name = "digits"
    fingerprint_prefix = "digits-cnn-"
    num_classes = NUM_CLASSES
    note = ("digits extractor: a small classifier trained on the embedded digits; these numbers are "
            "comparable only with other runs scored by the same weights, not with Inception FIDs")

    def __init__(self, weights: str | Path | None, device: torch.device):
        super().__init__(device)
        path = DEFAULT_WEIGHTS if weights is None else Path(weights).expanduser()
        self.net = load_digits_cnn(path, device)
        self._identify_weights(path)
        self.feature_dim = self.net.head.in_features

    def _forward(self, images):
        return self.net(preprocess(images))  # (B, 64), (B, 10)

    def describe(self):
        return {**super().describe(), "sha256": self.sha256}


@functools.lru_cache(maxsize=4)
def _cached_net(path: str, device: str) -> DigitsCNN:
    return load_digits_cnn(path, device)


@torch.no_grad()
def classify(images: np.ndarray,
             weights: str | Path | None = None,
             device: str | None = "cpu",
             batch_size: int = 1024,
             ) -> np.ndarray:
    """Predicted digit (N,) int64 of uint8 images (N, H, W, 3) or (N, H, W), any size."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise FidEvalError(f"classify expects uint8 (N, H, W, 3) or (N, H, W), got {images.dtype} {images.shape}")
    if images.ndim == 3:
        images = images[..., None]
    dev = resolve_device(device)
    net = _cached_net(str(DEFAULT_WEIGHTS if weights is None else Path(weights).expanduser()), str(dev))
    labels = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).to(dev)
        _, logits = net(preprocess(x.permute(0, 3, 1, 2)))  # (B, 10)
        labels.append(logits.argmax(dim=1).cpu())
    return torch.cat(labels).numpy().astype(np.int64) if labels else np.zeros(0, np.int64)
