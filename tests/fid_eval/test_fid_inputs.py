"""Image inputs: folders, ADM .npz (streamed), digits splits; one clear error per bad input."""

import numpy as np
import pytest
from PIL import Image

from fid_eval.errors import FidEvalError
from fid_eval.inputs import ArraySource, is_stats_file, open_images


def _images(n=5, h=6, w=7, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _all(source, batch_size=2, limit=None):
    return np.concatenate(list(source.batches(batch_size, limit)))


def test_npz_streams_the_same_images_in_any_batch_size(tmp_path):
    images, labels = _images(), np.arange(5)
    np.savez(tmp_path / "s.npz", arr_0=images, arr_1=labels)
    np.savez_compressed(tmp_path / "c.npz", arr_0=images)
    for name in ("s.npz", "c.npz"):
        src = open_images(str(tmp_path / name))
        assert (src.num_images, src.image_size) == (5, (6, 7))
        for bs in (1, 2, 5, 64):
            assert np.array_equal(_all(src, bs), images)
        assert np.array_equal(_all(src, 2, limit=3), images[:3])
    assert np.array_equal(open_images(str(tmp_path / "s.npz")).labels, labels)


def test_npz_grey_images_are_repeated_to_rgb(tmp_path):
    grey = _images()[..., 0]
    np.savez(tmp_path / "g.npz", arr_0=grey)
    out = _all(open_images(str(tmp_path / "g.npz")))
    assert out.shape == (5, 6, 7, 3) and all(np.array_equal(out[..., c], grey) for c in range(3))


def test_npz_reference_batch_exposes_stored_statistics(tmp_path):
    np.savez(tmp_path / "ref.npz", arr_0=_images(), mu=np.ones(3), sigma=np.eye(3))
    src = open_images(str(tmp_path / "ref.npz"))
    assert np.array_equal(src.stored_stats["mu"], np.ones(3)) and src.stored_stats["sigma"].shape == (3, 3)
    assert not is_stats_file(tmp_path / "ref.npz")
    np.savez(tmp_path / "stats.npz", mu=np.ones(3), sigma=np.eye(3))
    assert is_stats_file(tmp_path / "stats.npz")


def test_folder_reads_sorted_rgb(tmp_path):
    images = _images()
    for i, im in enumerate(images):
        Image.fromarray(im).save(tmp_path / f"{i:03d}.png")
    Image.fromarray(images[0, ..., 0]).save(tmp_path / "sub_grey.png")  # grey: converted to RGB
    (tmp_path / "notes.txt").write_text("not an image")
    src = open_images(str(tmp_path), workers=2)
    out = _all(src, 4)
    assert src.num_images == 6 and np.array_equal(out[:5], images)
    assert np.array_equal(out[5], np.repeat(images[0, ..., :1], 3, axis=2))
    assert src.content_hash() == open_images(str(tmp_path)).content_hash()


def test_digits_splits():
    val = open_images("digits:val")
    assert val.num_images == 297 and val.image_size == (16, 16) and val.labels.shape == (297,)
    assert _all(val, 100).shape == (297, 16, 16, 3)


@pytest.mark.parametrize("make, spec, message", [
    (lambda p: p.joinpath("empty").mkdir(), "empty", "no images"),
    (lambda p: np.savez(p / "x.npz", images=_images()), "x.npz", "no 'arr_0'"),
    (lambda p: np.savez(p / "f.npz", arr_0=_images().astype(np.float32)), "f.npz", "uint8"),
    (lambda p: np.savez(p / "n.npz", arr_0=np.zeros((0, 4, 4, 3), np.uint8)), "n.npz", "no images"),
    (lambda p: np.savez(p / "c.npz", arr_0=np.zeros((2, 4, 4, 5), np.uint8)), "c.npz", r"\(N, H, W, 3\)"),
    (lambda p: p.joinpath("bad.npz").write_bytes(b"not a zip file"), "bad.npz", "not a readable .npz"),
    (lambda p: p.joinpath("x.jpg.txt").write_text("?"), "x.jpg.txt", "expected an image folder"),
    (lambda p: None, "missing.npz", "no such file or folder"),
])
def test_bad_inputs_give_one_clear_error(tmp_path, make, spec, message):
    make(tmp_path)
    with pytest.raises(FidEvalError, match=message):
        open_images(str(tmp_path / spec))


def test_folder_of_mixed_sizes_is_refused_before_reading(tmp_path):
    Image.fromarray(_images(1, 8, 8)[0]).save(tmp_path / "a.png")
    Image.fromarray(_images(1, 8, 9)[0]).save(tmp_path / "b.png")
    with pytest.raises(FidEvalError, match=r"mixed sizes, e\.g\. a\.png is 8x8 and b\.png is 9x8"):
        open_images(str(tmp_path))


def test_corrupt_image_file_is_named(tmp_path):
    Image.fromarray(_images(1)[0]).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(FidEvalError, match="b.png: not a readable image"):
        open_images(str(tmp_path))


def test_unknown_digits_split_and_bad_arrays():
    with pytest.raises(FidEvalError, match="unknown digits split 'test'"):
        open_images("digits:test")
    with pytest.raises(FidEvalError, match="uint8"):
        ArraySource(np.zeros((2, 4, 4, 3)))
