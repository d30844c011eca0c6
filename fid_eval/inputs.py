"""Image inputs: an image folder, an ADM-style `.npz`, the embedded digits split, or an array in memory.

Every source is checked when it is opened (exists, not empty, one image size, uint8 pixels), so a bad
input fails before any network is built. Batches come out as uint8 (B, H, W, 3) RGB; grey images are
repeated to 3 channels. `.npz` files are streamed from the zip member, so a 50K x 256^2 batch (10 GB)
never sits in memory. `content_hash()` keys the statistics cache.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from fid_eval.errors import FidEvalError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
DIGITS_PREFIX = "digits:"
DIGITS_SPLITS = ("train", "val", "all")
DIGITS_SIZE = 16  # the demo's image size (samples are uint8 NHWC RGB, DESIGN.md §8)


def _to_rgb(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W) or (N, H, W, 1|3) -> (N, H, W, 3)."""
    if images.ndim == 3:
        images = images[..., None]
    return np.repeat(images, 3, axis=3) if images.shape[3] == 1 else images


def _check_image_array(shape: tuple, dtype: np.dtype, what: str) -> None:
    if dtype != np.uint8:
        raise FidEvalError(f"{what}: images must be uint8 in 0..255, got dtype {dtype}")
    if not (len(shape) == 3 or (len(shape) == 4 and shape[3] in (1, 3))):
        raise FidEvalError(f"{what}: images must be (N, H, W, 3) NHWC (or (N, H, W) grey), got shape {shape}")
    if shape[0] == 0:
        raise FidEvalError(f"{what}: holds no images (shape {shape})")


def _hash_file(path: Path, digest) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)


class ImageSource:
    """Images to featurise. Subclasses set name, num_images, image_size (H, W) and labels (N,) or None."""

    name: str
    num_images: int
    image_size: tuple[int, int]
    labels: np.ndarray | None = None
    # ADM reference batches carry Inception statistics: mu (2048,), sigma (2048, 2048) of pool3 and, for
    # sFID, mu_s (2023,), sigma_s (2023, 2023) of the spatial features; None when there are none.
    stored_stats: dict[str, np.ndarray] | None = None

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[np.ndarray]:
        """uint8 (B, H, W, 3) batches in order, of the first `limit` images (all when None)."""
        raise NotImplementedError

    def content_hash(self) -> str:
        """sha256 hex digest of the images' bytes (of the files that hold them)."""
        raise NotImplementedError


class ArraySource(ImageSource):
    """Images already in memory: uint8 (N, H, W[, C]). Also the embedded digits splits."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None = None, name: str = "array"):
        images = np.asarray(images)
        _check_image_array(images.shape, images.dtype, name)
        self.images = _to_rgb(images)
        self.name, self.num_images = name, len(images)
        self.image_size = tuple(self.images.shape[1:3])
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)

    def batches(self, batch_size, limit=None):
        n = self.num_images if limit is None else min(limit, self.num_images)
        for start in range(0, n, batch_size):
            yield self.images[start:min(start + batch_size, n)]

    def content_hash(self):
        digest = hashlib.sha256(str(self.images.shape).encode())
        digest.update(np.ascontiguousarray(self.images).tobytes())
        return digest.hexdigest()


class NpzSource(ImageSource):
    """ADM-style `.npz`: `arr_0` uint8 (N, H, W, 3); optional `arr_1` labels, `mu`/`sigma`/`mu_s`/`sigma_s`."""

    def __init__(self, path: Path):
        self.path, self.name = path, str(path)
        try:
            with zipfile.ZipFile(path) as zf:
                members = set(zf.namelist())
                if "arr_0.npy" not in members:
                    keys = sorted(m.removesuffix(".npy") for m in members)
                    raise FidEvalError(f"{path}: no 'arr_0' array (keys: {keys}); expected an ADM-style .npz "
                                       "with arr_0 uint8 (N, H, W, 3), or statistics with 'mu' and 'sigma'")
                with zf.open("arr_0.npy") as f:
                    shape, dtype = self._read_header(f)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise FidEvalError(f"{path}: not a readable .npz file ({e})") from None
        _check_image_array(shape, dtype, str(path))
        self.shape = shape
        self.num_images, self.image_size = shape[0], (shape[1], shape[2])
        try:
            with np.load(path, allow_pickle=False) as data:
                if "arr_1.npy" in members:
                    labels = data["arr_1"]
                    if labels.shape == (self.num_images,) and np.issubdtype(labels.dtype, np.integer):
                        self.labels = labels.astype(np.int64)
                stored = {k: data[k] for k in ("mu", "sigma", "mu_s", "sigma_s") if f"{k}.npy" in members}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # object arrays, truncated members
            raise FidEvalError(f"{path}: cannot read its arrays without unpickling ({e}); "
                               "expected plain numeric arrays (arr_0 uint8, arr_1 int labels, mu/sigma)") from None
        if "mu" in stored:
            self.stored_stats = stored

    def _read_header(self, f) -> tuple[tuple, np.dtype]:
        try:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran_order, dtype = read(f)
        except ValueError as e:
            raise FidEvalError(f"{self.path}: arr_0 is not a valid .npy array ({e})") from None
        if fortran_order:
            raise FidEvalError(f"{self.path}: arr_0 is stored in Fortran order; save it C-contiguous (np.savez)")
        return shape, dtype

    def batches(self, batch_size, limit=None):
        n = self.num_images if limit is None else min(limit, self.num_images)
        per_image = int(np.prod(self.shape[1:]))
        with zipfile.ZipFile(self.path) as zf, zf.open("arr_0.npy") as f:
            self._read_header(f)
            for start in range(0, n, batch_size):
                count = min(batch_size, n - start)
                raw = f.read(count * per_image)
                if len(raw) != count * per_image:
                    raise FidEvalError(f"{self.path}: arr_0 is truncated at image {start + len(raw) // per_image}")
                yield _to_rgb(np.frombuffer(raw, np.uint8).reshape((count,) + tuple(self.shape[1:])))

    def content_hash(self):
        digest = hashlib.sha256(b"npz")
        _hash_file(self.path, digest)
        return digest.hexdigest()


class FolderSource(ImageSource):
    """A folder (searched recursively) of image files of one size, read in sorted path order as RGB."""

    def __init__(self, path: Path, workers: int | None = None):
        from PIL import Image

        self.path, self.name = path, str(path)
        self.files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not self.files:
            raise FidEvalError(f"{path}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
        sizes = {}
        for p in self.files:  # headers only: cheap, and catches mixed sizes before featurising
            try:
                with Image.open(p) as im:
                    size = (im.height, im.width)
            except OSError as e:
                raise FidEvalError(f"{p}: not a readable image ({e})") from None
            sizes.setdefault(size, p)
            if len(sizes) > 1:
                (s0, p0), (s1, p1) = sizes.items()
                raise FidEvalError(f"{path}: images of mixed sizes, e.g. {p0.name} is {s0[1]}x{s0[0]} and "
                                   f"{p1.name} is {s1[1]}x{s1[0]} (WxH); resize them to one size first")
        self.num_images, self.image_size = len(self.files), next(iter(sizes))
        self.workers = workers or min(8, os.cpu_count() or 1)

    @staticmethod
    def _read(p: Path) -> np.ndarray:
        from PIL import Image

        try:
            with Image.open(p) as im:
                return np.asarray(im.convert("RGB"))
        except OSError as e:
            raise FidEvalError(f"{p}: not a readable image ({e})") from None

    def batches(self, batch_size, limit=None):
        files = self.files if limit is None else self.files[:limit]
        with ThreadPoolExecutor(self.workers) as pool:
            for start in range(0, len(files), batch_size):
                yield np.stack(list(pool.map(self._read, files[start:start + batch_size])))

    def content_hash(self):
        digest = hashlib.sha256(b"folder")
        for p in self.files:
            digest.update(str(p.relative_to(self.path)).encode() + b"\0")
            _hash_file(p, digest)
        return digest.hexdigest()


def digits_source(split: str) -> ArraySource:
    """The embedded digits `split` ("train", "val", "all") at 16x16, grey repeated to RGB, with labels."""
    from fid_eval.digits_data import load_digits_split

    if split not in DIGITS_SPLITS:
        raise FidEvalError(f"unknown digits split {split!r}; expected one of "
                           f"{', '.join(DIGITS_PREFIX + s for s in DIGITS_SPLITS)}")
    images, labels = load_digits_split(split, DIGITS_SIZE)
    return ArraySource(images, labels, name=DIGITS_PREFIX + split)


def is_stats_file(path: Path) -> bool:
    """True for a `.pt` file or an `.npz` with `mu`/`sigma` and no `arr_0` (a statistics file)."""
    if path.suffix == ".pt":
        return True
    if path.suffix != ".npz" or not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        members = set(zf.namelist())
    return "arr_0.npy" not in members and {"mu.npy", "sigma.npy"} <= members


def open_images(spec: str, workers: int | None = None) -> ImageSource:
    """The image source named by `spec`: "digits:<split>", a folder, or an ADM-style `.npz` path."""
    if spec.startswith(DIGITS_PREFIX):
        return digits_source(spec[len(DIGITS_PREFIX):])
    path = Path(spec).expanduser()
    if path.is_dir():
        return FolderSource(path, workers)
    if not path.exists():
        raise FidEvalError(f"{spec}: no such file or folder")
    if path.suffix == ".npz":
        return NpzSource(path)
    raise FidEvalError(f"{spec}: expected an image folder, an ADM-style .npz, a statistics .npz/.pt, "
                       f"or {DIGITS_PREFIX}train|val|all")
