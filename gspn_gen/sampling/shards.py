"""The shards of a resumable .npz batch in OUT.parts/: one file per shard, a manifest of the settings
they were drawn with, the checks that decide whether a shard can be used, and the final assembly."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import numpy as np

from gspn_gen.fileio import write_json
from gspn_gen.sampling.draw import save_npz
from gspn_gen.sampling.request import SamplingError

SHARD_NAME = re.compile(r"shard-\d{5,}\.npz")


def shard_path(parts: Path, k: int) -> Path:
    return parts / f"shard-{k:05d}.npz"


def _npy_header(zf: zipfile.ZipFile, name: str) -> tuple[tuple, np.dtype]:
    """(shape, dtype) of an array in an .npz, read from its header without loading the data."""
    with zf.open(f"{name}.npy") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    return shape, dtype


def shard_problem(path: Path, labels: np.ndarray, key: str) -> str | None:
    """Why the shard at `path` cannot be used (None when it can): unreadable, other settings, count, labels."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if "settings" not in z.files or str(z["settings"][()]) != key:
                return "was drawn with other settings or another checkpoint"
            got = z["arr_1"]
            shape, dtype = _npy_header(z.zip, "arr_0")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        return f"is unreadable ({type(e).__name__})"
    if len(shape) != 4 or shape[0] != len(labels) or shape[3] != 3 or dtype != np.uint8:
        return f"holds images of shape {shape} {dtype}, expected ({len(labels)}, H, W, 3) uint8"
    if got.shape != labels.shape or not np.array_equal(got, labels):
        return f"holds {len(got)} labels that differ from the {len(labels)} expected"
    return None


def assemble(parts: Path, out: str, labels: np.ndarray, bounds: dict, key: str) -> None:
    """Check every shard (settings, count, labels, image size), write `out`, then remove the shards."""
    images = None  # filled shard by shard: rank 0 holds one copy of the batch, not two
    for k, (s, e) in bounds.items():
        path = shard_path(parts, k)
        problem = shard_problem(path, labels[s:e], key) if path.exists() else "is missing"
        if problem:
            raise SamplingError(f"{path} {problem}; run the same command again to draw it")
        with np.load(path, allow_pickle=False) as shard:
            block = shard["arr_0"]
        if images is None:
            images = np.empty((len(labels), *block.shape[1:]), dtype=np.uint8)
        elif block.shape[1:] != images.shape[1:]:
            raise SamplingError(f"{path} holds {block.shape[1:]} images, shard 0 holds {images.shape[1:]}; "
                                f"delete {parts}")
        images[s:e] = block
    save_npz(images, labels, out)
    for k in bounds:
        shard_path(parts, k).unlink()
    (parts / "settings.json").unlink()  # last: until then a rerun still recognises the shards
    for leftover in parts.iterdir():  # e.g. shards of a killed run with a larger --num-samples
        leftover.unlink()
    parts.rmdir()


def manifest_differs(parts: Path, settings: dict) -> bool:
    """Whether OUT.parts/ holds a manifest of other settings (or an unreadable one)."""
    try:
        return json.loads((parts / "settings.json").read_text()) != settings
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        return True


def clear_parts(parts: Path) -> None:
    """Remove what sample.py keeps in OUT.parts/ (shards, manifest, temp files) and the folder if then empty."""
    for entry in parts.iterdir():
        if entry.name == "settings.json" or SHARD_NAME.fullmatch(entry.name) or entry.name.endswith(".tmp"):
            entry.unlink()
    if not any(parts.iterdir()):
        parts.rmdir()


def write_manifest(parts: Path, settings: dict) -> None:
    """Record the sampling settings beside the shards; a manifest without any shard drawn is replaced."""
    manifest = parts / "settings.json"
    if not manifest.exists() or not any(parts.glob("shard-*.npz")):
        write_json(manifest, settings)


def check_manifest(parts: Path, settings: dict) -> None:
    """Refuse to resume shards that were drawn with other settings or from another checkpoint file."""
    try:
        old = json.loads((parts / "settings.json").read_text())
    except (OSError, ValueError) as e:
        raise SamplingError(f"{parts / 'settings.json'} is unreadable ({type(e).__name__}); delete {parts} to start "
                            "over") from None
    if old == settings:
        return
    if old.get("ckpt") != settings["ckpt"]:
        raise SamplingError(f"{parts} holds shards drawn from another checkpoint: the --ckpt file is not the one they came from "
             f"(size:sha256 {old.get('ckpt')} then, {settings['ckpt']} now); sample with that checkpoint, or "
             f"delete {parts} to start over")
    diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
    raise SamplingError(f"{parts} holds shards drawn with other settings {diff}; delete it or rerun with the same ones")
