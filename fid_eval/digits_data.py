"""The embedded default data: scikit-learn's bundled handwritten digits.

1,797 real 8x8 grey images of the digits 0-9 ship inside scikit-learn, so the demo and the tests
need no download. The train/val split is fixed (a seeded permutation). The evaluation suite owns it:
`digits:val` is the demo's reference set and the `digits` extractor's classifier is trained on
`digits:train`; the generator's datamodule reads the same split through `gspn_gen.data.digits`, so
"held-out" means the same images everywhere.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

NUM_CLASSES = 10
CLASS_NAMES = [str(i) for i in range(NUM_CLASSES)]
VAL_SIZE = 297  # 1,500 train images remain
SPLIT_SEED = 0
SUPPORTED_SIZES = (8, 16, 32)


def load_digits_split(split: str, image_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 (N, H, W) in 0..255, labels int64 (N,)) of the fixed `split`.

    `split` is "train", "val" or "all"; images are upsampled from 8x8 to `image_size` bilinearly.
    """
    from sklearn.datasets import load_digits

    if split not in ("train", "val", "all"):
        raise ValueError(f"digits split must be 'train', 'val' or 'all', got {split!r}")
    if image_size not in SUPPORTED_SIZES:
        raise ValueError(f"digits image_size must be one of {SUPPORTED_SIZES}, got {image_size}")
    bunch = load_digits()
    images = bunch.images.astype(np.float32) / 16.0  # (1797, 8, 8) in [0, 1]
    labels = bunch.target.astype(np.int64)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    if split == "val":
        order = order[:VAL_SIZE]
    elif split == "train":
        order = order[VAL_SIZE:]
    images, labels = images[order], labels[order]
    if image_size != 8:
        t = torch.from_numpy(images)[:, None]
        t = F.interpolate(t, size=(image_size, image_size), mode="bilinear", align_corners=False)
        images = t[:, 0].clamp(0, 1).numpy()
    return np.round(images * 255.0).astype(np.uint8), labels
