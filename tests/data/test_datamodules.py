"""Pixel datamodules: the embedded digits split and Fashion-MNIST from IDX files."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from gspn_gen.data.datamodule import DataError, DigitsDataModule, FashionMNISTDataModule
from gspn_gen.data.digits import load_digits_split


def test_digits_split_is_fixed_disjoint_and_complete():
    train_x, train_y = load_digits_split("train", 8)
    val_x, val_y = load_digits_split("val", 8)
    all_x, _ = load_digits_split("all", 8)
    assert len(train_x) == 1500 and len(val_x) == 297 and len(all_x) == 1797
    assert np.array_equal(load_digits_split("val", 8)[0], val_x)  # the same every time
    rows = {x.tobytes() for x in train_x}
    assert sum(x.tobytes() in rows for x in val_x) < 5  # (a few real duplicates exist in the data)
    assert set(np.unique(train_y)) == set(range(10)) == set(np.unique(val_y))


def test_digits_datamodule_batches():
    dm = DigitsDataModule(image_size=16, batch_size=32)
    assert (dm.num_classes, dm.channels, dm.size, dm.codec) == (10, 1, 16, {"name": "identity"})
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 16, 16) and y.dtype == torch.int64
    assert x.min() >= -1 and x.max() <= 1 and x.min() == -1  # background is black


def test_digits_datamodule_rejects_bad_size():
    with pytest.raises(ValueError, match="image_size must be one of"):
        DigitsDataModule(image_size=12)


def write_idx(path, array: np.ndarray) -> None:
    """An IDX file (the (Fashion-)MNIST format), gzipped when the name ends in .gz."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with (gzip.open if str(path).endswith(".gz") else open)(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_idx_files_and_pads_to_32(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 5)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    dm = FashionMNISTDataModule(root=str(tmp_path), image_size=32, batch_size=4)
    dm.setup("fit")
    x, y = dm.train_set.tensors
    assert x.shape == (12, 1, 32, 32) and (x[:, :, :2] == -1).all()  # 2 px of black padding
    assert y.tolist() == [i % 10 for i in range(12)] and len(dm.val_set) == 5


def test_fashion_mnist_missing_files_say_how_to_get_them(tmp_path):
    with pytest.raises(DataError, match="dataset-fashion-mnist"):  # at construction, before a run starts
        FashionMNISTDataModule(root=str(tmp_path))
    with pytest.raises(DataError, match="not a directory"):
        FashionMNISTDataModule(root=str(tmp_path / "missing"))


def test_torchvision_grey_set_as_rgb(tmp_path):
    from gspn_gen.data.datamodule import TorchvisionDataModule

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("t10k", 3)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    dm = TorchvisionDataModule("MNIST", str(tmp_path), image_size=32, channels=3, batch_size=3, num_workers=0)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (3, 3, 32, 32) and y.dtype == torch.int64 and torch.equal(x[:, 0], x[:, 1])  # grey repeated to RGB
    with pytest.raises(ValueError, match="unknown torchvision data set"):
        TorchvisionDataModule("NoSuchSet", str(tmp_path))
