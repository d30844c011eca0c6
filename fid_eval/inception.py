"""Inception-v3 features through torch-fidelity's `inception-v3-compat`, from a local weights file only.

torch-fidelity reproduces the TensorFlow graph behind ADM's and StyleGAN's FIDs (its bilinear resize to
299 matches TF1, its pool3 and unbiased logits too). Left alone it downloads its weights from GitHub;
here the file must already be on disk, and a missing, unreadable or mis-shaped file is a one-line
FidEvalError saying what to put where. Features: pool3 (2048-d) for FID/KID/P&R; logits without the
fc bias (1008-d, torch-fidelity's choice for IS).
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import torch

from fid_eval.errors import FidEvalError
from fid_eval.extractors import Extractor, sha256_file

WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_FILE}"
# torch.hub names files "<name>-<first hex digits of sha256>.<ext>"; anything else is not the official file.
OFFICIAL_SHA256_PREFIX = "6726825d"
FEATURES = ("2048", "logits_unbiased")


def default_weights_path() -> Path:
    """Where torch-fidelity's download would put the weights: $TORCH_HOME/hub/checkpoints/<file>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


def load_inception_state_dict(path: str | Path | None) -> tuple[dict, Path]:
    """Read the weights file (weights_only) or raise a FidEvalError that says how to get it."""
    path = default_weights_path() if path is None else Path(path).expanduser()
    if not path.is_file():
        raise FidEvalError(
            f"Inception weights not found at {path}. This machine cannot download them: fetch {WEIGHTS_URL} "
            f"elsewhere and copy it to {default_weights_path()}, or pass --weights PATH"
        )
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise FidEvalError(f"{path}: not a readable PyTorch weights file ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(state_dict, dict) or not all(torch.is_tensor(v) for v in state_dict.values()):
        raise FidEvalError(f"{path}: expected a state_dict (name -> tensor) of inception-v3-compat, "
                           f"got {type(state_dict).__name__}")
    return state_dict, path


def _mismatch_summary(error: RuntimeError) -> str:
    """The first problem named in load_state_dict's multi-line error, key lists shortened to 3 names."""
    lines = [ln.strip() for ln in str(error).splitlines()[1:] if ln.strip()]
    if not lines:
        return str(error)
    kind, _, rest = lines[0].partition(": ")
    names = re.findall(r'"([^"]+)"', rest)
    if names:  # Missing / Unexpected key(s) in state_dict: "a", "b", ...
        return f"{kind}: {len(names)} names, e.g. {', '.join(names[:3])}"
    return lines[0]


class InceptionExtractor(Extractor):
    """torch-fidelity's FeatureExtractorInceptionV3 ("inception-v3-compat") in float32."""

    name = "inception"
    feature_dim = 2048
    num_classes = 1008

    def __init__(self, weights: str | Path | None, device: torch.device):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        super().__init__(device)
        state_dict, path = load_inception_state_dict(weights)
        # torch-fidelity unpickles its argument with no weights_only guard; hand it a buffer re-serialised
        # from the tensors we loaded safely, so nothing but tensors is ever unpickled.
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)
        buffer.seek(0)
        try:
            net = FeatureExtractorInceptionV3("inception-v3-compat", list(FEATURES),
                                              feature_extractor_weights_path=buffer)
        except RuntimeError as e:
            raise FidEvalError(f"{path}: does not fit inception-v3-compat ({_mismatch_summary(e)})") from None
        self.net = net.to(device)
        sha = sha256_file(path)
        self.weights_path, self.sha256 = str(path), sha
        self.official = sha.startswith(OFFICIAL_SHA256_PREFIX)
        self.fingerprint = f"inception-v3-compat-{sha[:16]}"
        self.note = ("torch-fidelity inception-v3-compat, official weights: comparable with ADM/torch-fidelity FIDs"
                     if self.official else
                     f"WARNING: {path.name} is not the official inception-v3-compat file (sha256 {sha[:8]}..., "
                     f"expected {OFFICIAL_SHA256_PREFIX}...): these numbers are not comparable with published ones")

    def _forward(self, images):
        features, logits = self.net(images)  # (B, 2048), (B, 1008)
        return features, logits

    def describe(self):
        return {**super().describe(), "sha256": self.sha256, "official_weights": self.official}
