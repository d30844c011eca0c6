"""ADM center crop and the fault-tolerant image folder dataset."""

import numpy as np
import pytest
import torch
from PIL import Image

from gspn_gen.data.images import ImageFolderDataset, center_crop, scan_image_folder, to_tensor
from tests import helpers


@pytest.mark.parametrize("width, height", [(32, 32), (40, 32), (32, 45), (67, 64), (300, 100)])
def test_center_crop_gives_the_target_size(width, height):
    image = Image.fromarray(np.zeros((height, width, 3), np.uint8))
    assert center_crop(image, 32).size == (32, 32)


def test_center_crop_keeps_the_middle():
    # Three 32-wide bands (red | green | blue): the 32 x 32 crop is the green one.
    bands = np.zeros((32, 96, 3), np.uint8)
    for i in range(3):
        bands[:, 32 * i : 32 * (i + 1), i] = 255
    out = np.asarray(center_crop(Image.fromarray(bands), 32))
    assert (out[..., 1] == 255).all() and (out[..., [0, 2]] == 0).all()


def test_center_crop_box_halving_keeps_flat_colour():
    image = Image.new("RGB", (256, 300), (10, 200, 30))
    out = np.asarray(center_crop(image, 32))
    assert (out == np.array([10, 200, 30], np.uint8)).all()


def test_to_tensor_range():
    x = to_tensor(Image.fromarray(np.array([[[0, 128, 255]]], np.uint8)))
    assert x.shape == (3, 1, 1)
    torch.testing.assert_close(x.flatten(), torch.tensor([-1.0, 128 / 127.5 - 1, 1.0]))


def test_image_folder_dataset(image_folder):
    ds = ImageFolderDataset(str(image_folder), 32)
    assert ds.classes == list(helpers.CLASSES)
    assert len(ds) == sum(helpers.PER_CLASS) + 1  # + the corrupt file; notes.txt and .cache ignored
    labels = [label for _, label in ds.samples]
    assert labels == sorted(labels)
    assert any("nested" in path for path, _ in ds.samples)
    for i in range(len(ds)):
        image, label, index, error = ds[i]
        assert image.shape == (3, 32, 32) and label == labels[i] and index == i
        if ds.samples[i][0] == helpers.CORRUPT:
            assert "UnidentifiedImageError" in error and (image == 0).all()
        else:
            assert error == "" and -1 <= image.min() and image.max() <= 1


def test_scan_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        scan_image_folder(str(tmp_path / "nope"))
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ValueError, match="no images found.*1 class folders"):
        scan_image_folder(str(tmp_path))
