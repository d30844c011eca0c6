"""Every LightningDataModule the trainer takes (`--data`): the embedded digits, Fashion-MNIST, any
torchvision data set (pixel space), and extracted latent shards. The data sets and file formats they
serve live beside this file (digits.py, latents.py, images.py).

Every datamodule yields batches `(x, y)` of shape (B, C, H, W) with int64 labels -- pixels in [-1, 1],
or scaled latents -- and exposes `num_classes`, `channels`, `size`, `class_names` and `codec` before
`setup()` so that LightningCLI can link them into the model's arguments (the checkpoint then knows them).
Training loaders are resumable at any step (gspn_gen.data.sampler): the shuffled order, this rank's
share of it and the random flips are functions of (seed, epoch, position), saved with each checkpoint.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from gspn_gen.data import digits as digits_data
from gspn_gen.data.latents import LatentShards, read_meta
from gspn_gen.data.sampler import train_loader

IDENTITY_CODEC = {"name": "identity"}


class DataError(ValueError):
    """The data set cannot be read (missing files, wrong root); raised with a one-line reason."""


def _to_model_space(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) or (N, H, W, C) -> float (N, C, H, W) in [-1, 1]."""
    t = torch.from_numpy(images).float().div_(127.5).sub_(1.0)
    return t[:, None] if t.ndim == 3 else t.permute(0, 3, 1, 2).contiguous()


class _PixelDataModule(L.LightningDataModule):
    """Shared loader plumbing for in-memory pixel data sets."""

    codec = IDENTITY_CODEC

    def __init__(self, batch_size: int, num_workers: int):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def train_dataloader(self) -> DataLoader:
        return train_loader(self.train_set, self.batch_size, self.num_workers, self.trainer)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)


class DigitsDataModule(_PixelDataModule):
    """scikit-learn's 1,797 handwritten digits (embedded, offline), fixed 1,500/297 train/val split."""

    num_classes = digits_data.NUM_CLASSES
    channels = 1
    class_names = digits_data.CLASS_NAMES

    def __init__(self, image_size: int = 16, batch_size: int = 64, num_workers: int = 0):
        """Args:
            image_size: 8, 16 or 32 (the 8x8 originals upsampled bilinearly).
            batch_size: images per training batch (per device).
            num_workers: DataLoader worker processes (0: load in the main process; the data is tiny).
        """
        super().__init__(batch_size, num_workers)
        if image_size not in digits_data.SUPPORTED_SIZES:
            raise ValueError(f"image_size must be one of {digits_data.SUPPORTED_SIZES}, got {image_size}")
        self.size = image_size

    def setup(self, stage: str | None = None) -> None:
        for split in ("train", "val"):
            images, labels = digits_data.load_digits_split(split, self.size)
            ds = TensorDataset(_to_model_space(images), torch.from_numpy(labels))
            setattr(self, f"{split}_set", ds)


FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"


def _read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file, the format of (Fashion-)MNIST."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims).copy()


def _find_idx(root: Path, stem: str) -> Path:
    if not root.is_dir():
        raise DataError(
            f"Fashion-MNIST root {str(root)!r} is not a directory: install Debian's package (`apt-get install "
            "dataset-fashion-mnist`, `dpkg -L dataset-fashion-mnist` shows where) or pass --data.root DIR"
        )
    for name in (f"{stem}.gz", stem):
        hits = sorted(root.rglob(name))
        if hits:
            return hits[0]
    raise DataError(
        f"no {stem}(.gz) under {root}: install Debian's package (`apt-get install dataset-fashion-mnist`, "
        "`dpkg -L dataset-fashion-mnist` shows where) or pass --data.root DIR"
    )


class FashionMNISTDataModule(_PixelDataModule):
    """Fashion-MNIST (70,000 real 28x28 grey images, 10 classes) from local IDX files (no download)."""

    num_classes = 10
    channels = 1
    class_names = FASHION_CLASSES

    def __init__(self, root: str = FASHION_DEFAULT_ROOT, image_size: int = 32, batch_size: int = 128,
                 num_workers: int = 0):
        """Args:
            root: folder holding the (gzipped) IDX files, searched recursively.
            image_size: 28 (native), 32 (padded 2 px per side) or any other size (resized).
            batch_size: images per training batch (per device).
            num_workers: DataLoader worker processes.
        """
        super().__init__(batch_size, num_workers)
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        self.root = Path(root)
        self.size = image_size
        for stem in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"):  # say now, not after the run starts
            _find_idx(self.root, stem)

    def _load(self, prefix: str) -> TensorDataset:
        images = _read_idx(_find_idx(self.root, f"{prefix}-images-idx3-ubyte"))
        labels = _read_idx(_find_idx(self.root, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
        x = _to_model_space(images)
        if self.size == 32:
            x = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)
        elif self.size != 28:
            x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear",
                                                antialias=True, align_corners=False)
        return TensorDataset(x, torch.from_numpy(labels))

    def setup(self, stage: str | None = None) -> None:
        self.train_set = self._load("train")
        self.val_set = self._load("t10k")


class _ToRGB:
    """PIL image -> RGB (a picklable transform, so DataLoader workers can use it)."""

    def __call__(self, image):
        return image.convert("RGB")


class TorchvisionDataModule(_PixelDataModule):
    """Any torchvision classification data set by name (CIFAR10, MNIST, ...) from `root`.

    Nothing is downloaded unless `download=True`. Images are resized to `image_size` and scaled to [-1, 1].
    """

    def __init__(self, name: str, root: str, image_size: int = 32, channels: int = 3,
                 num_classes: int = 10, batch_size: int = 128, num_workers: int = 4, download: bool = False):
        """Args:
            name: class name in torchvision.datasets, e.g. CIFAR10 or MNIST.
            root: the data set's root directory.
            image_size: images are resized and center-cropped to this size.
            channels: 3 for RGB, 1 to convert to grey.
            num_classes: number of classes of the data set.
            batch_size: images per training batch (per device).
            num_workers: DataLoader worker processes.
            download: let torchvision download the data set (off by default).
        """
        super().__init__(batch_size, num_workers)
        import torchvision

        if not hasattr(torchvision.datasets, name):
            raise ValueError(f"unknown torchvision data set {name!r} (e.g. CIFAR10, MNIST, FashionMNIST)")
        if not download and not os.path.isdir(root):
            raise DataError(f"data root {root!r} is not a directory (set download: true to let torchvision fetch it)")
        self.name, self.root, self.download = name, root, download
        self.size, self.channels, self.num_classes = image_size, channels, num_classes
        self.class_names = [str(i) for i in range(num_classes)]

    def _dataset(self, train: bool) -> Dataset:
        import torchvision
        from torchvision import transforms as T

        tf = [T.Resize(self.size), T.CenterCrop(self.size)]
        tf.append(T.Grayscale() if self.channels == 1 else _ToRGB())  # grey sets (MNIST) -> 3 equal channels
        tf += [T.ToTensor(), T.Normalize([0.5] * self.channels, [0.5] * self.channels)]
        cls = getattr(torchvision.datasets, self.name)
        try:
            return cls(self.root, train=train, transform=T.Compose(tf), download=self.download)
        except (RuntimeError, OSError) as e:  # torchvision: "Dataset not found or corrupted", unreadable files
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DataError(f"cannot read {self.name} from {self.root!r}: {reason}") from None

    def setup(self, stage: str | None = None) -> None:
        self.train_set = self._dataset(True)
        self.val_set = self._dataset(False)
        names = getattr(self.train_set, "classes", None)
        if names and len(names) == self.num_classes:
            self.class_names = list(names)


class LatentDataModule(L.LightningDataModule):
    """Batches (x float32 (B, C, h, w) scaled latents, y int64 (B,)) from an extracted shard directory.

    The attributes of the data contract (num_classes, channels, size, class_names, codec) come from
    meta.json in __init__, so LightningCLI can link them into the model before setup().
    """

    def __init__(
        self,
        root: str,                 # directory written by gspn_gen.data.extract
        batch_size: int = 32,      # per device
        num_workers: int = 4,      # DataLoader workers per device
        random_flip: bool = True,  # serve the mirrored image's latent half of the time
    ):
        super().__init__()
        self.save_hyperparameters()
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"need batch_size >= 1 and num_workers >= 0, got {batch_size} and {num_workers}")
        self.root, self.batch_size, self.num_workers, self.random_flip = root, batch_size, num_workers, random_flip
        self.meta = read_meta(root)
        channels, height, width = self.meta["latent_shape"]
        if height != width:
            raise ValueError(f"latents in {root!r} are not square: {self.meta['latent_shape']}")
        self.num_classes: int = self.meta["num_classes"]
        self.channels: int = channels
        self.size: int = height
        self.class_names: list[str] = list(self.meta["class_names"])
        self.codec: dict = dict(self.meta["codec"])
        self.dataset: LatentShards | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            self.dataset = LatentShards(self.root, self.meta["shards"], self.random_flip)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        try:  # the flips come with the order (one seed per position), so a resume repeats them too
            return train_loader(self.dataset, self.batch_size, self.num_workers, self.trainer, seeds=True,
                                pin_memory=torch.cuda.is_available())
        except ValueError as e:
            raise ValueError(f"{self.root!r}: {e}") from None
