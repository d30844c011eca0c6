"""Inception-v3 features through torch-fidelity's `inception-v3-compat`, from a local weights file only.

torch-fidelity reproduces the TensorFlow graph behind ADM's and StyleGAN's FIDs (its bilinear resize to
299 matches TF1, its pool3 and unbiased logits too). Left alone it downloads its weights from GitHub;
here the file must already be on disk, and a missing, unreadable or mis-shaped file is a one-line
FidEvalError saying what to put where. Features: pool3 (2048-d) for FID/KID/P&R; logits without the
fc bias (1008-d, torch-fidelity's choice for IS and the softmax ADM's evaluator takes); ADM's spatial
features (2,023-d) for sFID.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import torch

from fid_eval.errors import FidEvalError
from fid_eval.features import Extractor

WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_FILE}"
# torch.hub names files "<name>-<first hex digits of sha256>.<ext>"; anything else is not the official file.
OFFICIAL_SHA256_PREFIX = "6726825d"
FEATURES = ("2048", "logits_unbiased")

# sFID's spatial features, as ADM's evaluator (openai/guided-diffusion evaluations/evaluator.py) takes them:
# the TF graph tensor "mixed_6/conv:0", first 7 channels (`spatial[..., :7]` in NHWC), flattened to
# 17 x 17 x 7 = 2,023 values. "mixed_6" is the graph's seventh Inception block, Mixed_6d (torch-fidelity's
# weight converter maps mixed_6/conv/{conv2d_params,batchnorm} to Mixed_6d.branch1x1), and "mixed_6/conv:0"
# is that block's 1x1 branch after batch norm and ReLU: the output of the BasicConv2d Mixed_6d.branch1x1.
# A forward hook on that module reads it; flattening in NHWC order keeps the index order of the mu_s/sigma_s
# stored in ADM's reference batches, so ours can be compared with theirs.
SPATIAL_MODULE = "Mixed_6d.branch1x1"
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS


def spatial_features(conv_out: torch.Tensor) -> torch.Tensor:
    """Mixed_6d.branch1x1 output (B, 192, H, W) -> ADM's spatial features (B, H * W * 7), NHWC order."""
    return conv_out[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(conv_out.shape[0], -1)


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
    fingerprint_prefix = "inception-v3-compat-"
    feature_dim = 2048
    num_classes = 1008
    spatial_dim = SPATIAL_DIM

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
        self._spatial: torch.Tensor | None = None
        net.get_submodule(SPATIAL_MODULE).register_forward_hook(self._keep_spatial)
        self._identify_weights(path)
        sha = self.sha256
        self.official = sha.startswith(OFFICIAL_SHA256_PREFIX)
        self.note = ("torch-fidelity inception-v3-compat, official weights: comparable with ADM/torch-fidelity FIDs"
                     if self.official else
                     f"WARNING: {path.name} is not the official inception-v3-compat file (sha256 {sha[:8]}..., "
                     f"expected {OFFICIAL_SHA256_PREFIX}...): these numbers are not comparable with published ones")

    def _keep_spatial(self, module, inputs, output) -> None:
        self._spatial = spatial_features(output)  # (B, 2023)

    def _forward(self, images):
        self._spatial = None
        features, logits = self.net(images)  # (B, 2048), (B, 1008)
        spatial, self._spatial = self._spatial, None  # (B, 2023), set by the hook during the forward
        return features, logits, spatial

    def describe(self):
        return {**super().describe(), "sha256": self.sha256, "official_weights": self.official}
