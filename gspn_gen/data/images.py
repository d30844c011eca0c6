"""Image folders for latent extraction: ADM center-crop preprocessing and a fault-tolerant dataset.

The crop follows ADM (Dhariwal & Nichol 2021), as DiT and its successors do, so latents (and FID
reference batches) match theirs: halve with a BOX filter while the short side is at least twice the
target, resize the short side to the target with BICUBIC, then cut the center square.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """ADM center crop of a PIL image to `size` x `size` (same mode as the input)."""
    # Box-halve first: cheap anti-aliasing for images much larger than the target.
    while min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(
        (round(image.width * scale), round(image.height * scale)), resample=Image.BICUBIC
    )
    left = (image.width - size) // 2
    top = (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 (3, H, W) in [-1, 1]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


def scan_image_folder(root: str) -> tuple[list[str], list[tuple[str, int]]]:
    """ImageFolder layout: one folder per class (sorted names), images anywhere below it.

    Returns (class names, [(path relative to root, label)]) in a deterministic order: by class,
    then by relative path. Files without an image extension are ignored.
    """
    if not os.path.isdir(root):
        raise ValueError(f"image directory {root!r} does not exist or is not a directory")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    files = []
    for label, name in enumerate(classes):
        found = []
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, name), followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for f in filenames:
                if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."):
                    found.append(os.path.relpath(os.path.join(dirpath, f), root))
        files.extend((path, label) for path in sorted(found))
    if not files:
        raise ValueError(
            f"no images found in {root!r}: expected one sub-folder per class holding "
            f"{'/'.join(IMAGE_EXTENSIONS)} files (found {len(classes)} class folders)"
        )
    return classes, files


class ImageFolderDataset(Dataset):
    """Center-cropped images of an ImageFolder tree: item i -> (image, label, i, error).

    image is float32 (3, S, S) in [-1, 1]. A file that cannot be read or decoded yields a zero
    image and a non-empty `error` string instead of raising, so a DataLoader keeps going and the
    extractor can report the file; `error` is "" for good images.
    """

    def __init__(self, root: str, image_size: int):
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        self.root = os.path.abspath(root)
        self.image_size = image_size
        self.classes, self.samples = scan_image_folder(self.root)

    def __len__(self) -> int:
        return len(self.samples)

    def path(self, index: int) -> str:
        return os.path.join(self.root, self.samples[index][0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int, str]:
        label = self.samples[index][1]
        try:
            with Image.open(self.path(index)) as image:
                image = center_crop(image.convert("RGB"), self.image_size)
            return to_tensor(image), label, index, ""
        except Exception as err:  # noqa: BLE001 (corrupt, truncated, unsupported, unreadable: report it)
            blank = torch.zeros(3, self.image_size, self.image_size)
            return blank, label, index, f"{type(err).__name__}: {err}"
