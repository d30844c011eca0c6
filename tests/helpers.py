"""Helpers shared by tests in several folders: `from tests.helpers import ...`.

Test data made on the fly (nothing is downloaded): a tiny random VAE, a small image folder, latent
shards from them (session fixtures of the same names: tests/conftest.py, tests/data/conftest.py):

    vae = make_tiny_vae(tmp / "vae")
    images = make_image_folder(tmp / "images")
    root = make_latent_dataset(tmp / "latents", vae, images)   # in-process, one CPU device

The CUDA backend with fixed launch settings and variant (`backend`), for the emulation and the GPU tests; and
`run_as_on_gpu_image`, which runs a script as on the GPU machines, where omegaconf, jsonargparse,
torch-fidelity and diffusers are not installed. Standard library only at import (the GPU tests use it).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# Test data: a tiny VAE, an image folder, latent shards

CLASSES = ("cat", "dog", "fox")
PER_CLASS = (14, 13, 12)  # 39 good images
CORRUPT = "dog/zz_broken.png"  # sorted last within "dog"


def make_tiny_vae(directory: str | os.PathLike, seed: int = 0) -> str:
    """A random diffusers AutoencoderKL (2 blocks: downsample 2, 4 latent channels) saved to `directory`."""
    import torch
    from diffusers import AutoencoderKL

    directory = str(directory)
    if not os.path.exists(os.path.join(directory, "config.json")):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(8, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=32,
        )
        vae.save_pretrained(directory)
    return directory


def make_image_folder(directory: str | os.PathLike, size: int = 32, seed: int = 0) -> Path:
    """ImageFolder tree: 3 class folders, 39 PNGs (RGB, grey, non-square, 2x oversized), one corrupt file.

    Also holds a non-image file and a hidden folder, which the scanner must ignore.
    """
    import numpy as np
    from PIL import Image

    root = Path(directory)
    rng = np.random.default_rng(seed)
    for c, (name, n) in enumerate(zip(CLASSES, PER_CLASS)):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            h, w = [(size, size), (size + 8, size), (size, size + 13), (2 * size + 3, 2 * size)][i % 4]
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            pixels[..., c] = np.linspace(0, 255, w, dtype=np.uint8)  # some structure per class
            image = Image.fromarray(pixels)
            if i == 5:
                image = image.convert("L")
            sub = folder / "nested" if i == 7 else folder
            sub.mkdir(exist_ok=True)
            image.save(sub / f"img_{i:03d}.png")
    (root / CORRUPT).write_bytes(b"\x89PNG\r\n\x1a\n this is not a real png")
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / ".cache").mkdir(exist_ok=True)
    return root


def extract_args(images, out, vae, image_size: int = 32, shard_size: int = 8, batch_size: int = 5) -> list[str]:
    return [
        "--images", str(images), "--out", str(out), "--vae", str(vae), "--image-size", str(image_size),
        "--shard-size", str(shard_size), "--batch-size", str(batch_size), "--num-workers", "0",
        "--accelerator", "cpu", "--no-progress",
    ]


def run_extract_cli(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m gspn_gen.data.extract ARGS` in a subprocess (needed for several processes)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "gspn_gen.data.extract", *args],
        check=False, capture_output=True, text=True, timeout=timeout, env=env,
    )


def make_latent_dataset(out, vae, images, image_size: int = 32, shard_size: int = 8) -> Path:
    """Latent shards + meta.json in `out`, extracted in this process on one CPU device."""
    from gspn_gen.data.extract import extract

    extract(str(images), str(out), image_size, str(vae), shard_size=shard_size, batch_size=5,
            num_workers=0, accelerator="cpu", devices=1, progress=False)
    return Path(out)


# ---------------------------------------------------------------------------------------------
# The CUDA backend with fixed launch settings


def backend(launch, variant: str | None = None) -> SimpleNamespace:
    """cupy_backend's four functions with `launch` (and the CUDA variant, if given) fixed (the object
    testing.backend_mix expects)."""
    from gspn_gen.kernels import cupy_backend

    return SimpleNamespace(**{name: functools.partial(getattr(cupy_backend, name), launch=launch, variant=variant)
                              for name in ("mix_forward", "mix_backward", "scan_forward", "scan_backward")})


# ---------------------------------------------------------------------------------------------
# Scripts as on the GPU image

ABSENT_ON_GPU_IMAGE = ("omegaconf", "jsonargparse", "torch_fidelity", "diffusers")

# Runs the script with those packages unimportable and their metadata gone (optional-dependency checks
# read it), so that an import of one of them, however deep or late, fails the run.
_RUN_WITHOUT = f"""
import importlib.metadata as metadata, runpy, sys
ABSENT = {ABSENT_ON_GPU_IMAGE!r}
def absent(name):
    return name.split(".")[0].replace("-", "_").lower() in ABSENT
class Absent:
    def find_spec(self, name, path=None, target=None):
        if absent(name):
            raise ModuleNotFoundError(f"No module named {{name!r}} (not on the GPU image)")
sys.meta_path.insert(0, Absent())
def hide(lookup):
    def hidden(name, *args, **kwargs):
        if absent(name):
            raise metadata.PackageNotFoundError(name)
        return lookup(name, *args, **kwargs)
    return hidden
metadata.version, metadata.distribution = hide(metadata.version), hide(metadata.distribution)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_as_on_gpu_image(script: str | os.PathLike, *args: str, cwd, timeout: float = 300,
                        env: dict | None = None) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS` in `cwd` with ABSENT_ON_GPU_IMAGE unimportable; output captured as text."""
    return subprocess.run([sys.executable, "-c", _RUN_WITHOUT, str(script), *map(str, args)], cwd=cwd,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout,
                          check=False)
