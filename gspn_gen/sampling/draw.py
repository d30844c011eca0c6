"""Drawing images from a GenerationModule: guided sampling, decoding, grids, image and batch files.

Any object with the module's `hparams`, `model`, `ema`, `diffusion` and `null_class` will do, so the
training module draws its grids here (gspn_gen.lit) and `gspn_gen.sampling.run` draws requests here:
both draw the same way. Sample i's noise depends only on (seed, indices[i]) (gspn_gen.diffusion.rng),
never on batching. Values arrive checked (gspn_gen.sampling.request); nothing here validates them again.

`preflight` and `image_bytes` serve the checks made before a request's first sample: the codec (VAE)
loads and the network runs on the device (its kernel backend included), and the size of what is written.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from gspn_gen.codecs import build_codec
from gspn_gen.diffusion import PerSampleRNG, cfg_model_fn
from gspn_gen.fileio import atomic_write

IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}  # by lower-case extension


class NonFiniteSamplesWarning(RuntimeWarning):
    """Some samples held NaN/inf values (they come out black); `count` says how many."""

    def __init__(self, count: int, total: int):
        super().__init__(f"{count} of {total} samples hold NaN/inf values and are written as black pixels "
                         "(are the checkpoint's weights finite?)")
        self.count = count


@torch.no_grad()
def generate(
    module,                                   # GenerationModule (hparams + model + ema + diffusion)
    labels: torch.Tensor,                     # (N,) int64 class ids
    seed: int = 0,
    indices: Sequence[int] | None = None,     # global sample ids for the per-sample seeds; default 0..N-1
    cfg_scale: float = 1.0,
    steps: int | None = None,
    sampler: str | None = None,
    guidance_interval: tuple[float, float] | None = None,
    guide_channels: int | None = None,        # guide only the first k latent channels (DiT/SiT: 3)
    use_ema: bool = True,
    progress: bool = False,
) -> np.ndarray:
    """Sample images for `labels`; returns uint8 (N, H, W, 3) RGB (grey repeated to 3 channels).

    Guidance (cfg_scale != 1) needs a model with a null class (`has_null_class`)."""
    hp = module.hparams
    net = module.ema if use_ema else module.model
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    labels = labels.to(device=device, dtype=torch.long)
    n = labels.shape[0]
    indices = list(range(n)) if indices is None else list(indices)
    rng = PerSampleRNG(seed, indices, device)
    noise = rng.randn((hp.in_channels, hp.input_size, hp.input_size))
    model_fn = cfg_model_fn(net, cfg_scale, module.null_class, interval=guidance_interval,
                            time_scale=module.diffusion.time_scale, channels=guide_channels)
    z = module.diffusion.sample(model_fn, noise, labels, rng, sampler=sampler, steps=steps, progress=progress)
    images = decoder(module, device).decode(z)
    net.train(was_training)
    bad = int((~torch.isfinite(images.flatten(1))).any(1).sum())
    if bad:
        warnings.warn(NonFiniteSamplesWarning(bad, n), stacklevel=2)
    return to_uint8(images)


def has_null_class(module) -> bool:
    """Whether the model learned a null class (trained with label dropout), which guidance needs."""
    return module.model.y_embedder.dropout_prob > 0


@torch.no_grad()
def preflight(module, device: torch.device) -> int:
    """Load the codec and run the network once on one input, so that a missing VAE, a kernel backend that
    does not exist here or a model that does not fit the device fails now, not after hours of sampling.

    Returns the side of the decoded images. Raises ValueError or CodecLoadError with the reason.
    """
    hp = module.hparams
    codec = decoder(module, device)  # CodecLoadError: VAE missing, offline, not a VAE
    if codec.channels is not None and codec.channels != hp.in_channels:
        raise ValueError(f"the codec {codec.spec.get('path', codec.spec['name'])!r} has {codec.channels} latent "
                         f"channels, the model {hp.in_channels}")
    x = torch.zeros(1, hp.in_channels, hp.input_size, hp.input_size, device=device)
    try:
        module.ema.eval()(x, torch.zeros(1, device=device), torch.zeros(1, dtype=torch.long, device=device))
    except Exception as e:  # noqa: BLE001 - a backend, device or config problem of this checkpoint
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"the model cannot run on {device}: {reason}") from None
    return hp.input_size * codec.downsample


def image_bytes(side: int) -> int:
    """Bytes of one decoded sample as written (uint8 RGB)."""
    return side * side * 3


def decoder(module, device: torch.device):
    """The module's codec (from its hparams), built once and cached on the module (a VAE is large)."""
    spec = module.hparams.codec or {"name": "identity"}
    cached = getattr(module, "_codec_cache", None)
    if cached is None or cached[0] != (spec, device):
        module._codec_cache = ((spec, device), build_codec(spec).to(device))
    return module._codec_cache[1]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> uint8 (N, H, W, 3); one channel is repeated to RGB."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def class_grid(
    images: np.ndarray,                       # (N, H, W, 3) uint8, grouped by class: per_class images each
    labels: Sequence[int],
    per_class: int,
    class_names: Sequence[str] | None = None,
    pad: int = 2,
    min_cell: int = 32,
) -> np.ndarray:
    """One row per class with its name on the left; small images are upscaled (nearest) to `min_cell`."""
    from PIL import Image, ImageDraw

    n, h, w, _ = images.shape
    h, w = _cell(h, min_cell), _cell(w, min_cell)
    rows = n // per_class
    names = [str(class_names[labels[r * per_class]]) if class_names else str(labels[r * per_class])
             for r in range(rows)]
    label_w = 8 + 7 * max(len(s) for s in names)
    canvas = Image.new("RGB", (label_w + per_class * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r in range(rows):
        y0 = pad + r * (h + pad)
        draw.text((4, y0 + h // 2 - 5), names[r], fill=(0, 0, 0))
        for c in range(per_class):
            tile = Image.fromarray(images[r * per_class + c]).resize((w, h), Image.NEAREST)
            canvas.paste(tile, (label_w + pad + c * (w + pad), y0))
    return np.asarray(canvas)


def _cell(side: int, min_cell: int) -> int:
    return side * max(1, -(-min_cell // side))


def grid_bytes(rows: int, per_class: int, side: int, pad: int = 2, min_cell: int = 32, label_w: int = 200) -> int:
    """Upper bound of the bytes of a `class_grid` canvas (uint8 RGB) of `rows` x `per_class` images of `side`."""
    cell = _cell(side, min_cell) + pad
    return (label_w + per_class * cell + pad) * (rows * cell + pad) * 3


def save_image(image: np.ndarray, path: str) -> None:
    """Write a uint8 (H, W, 3) array in the format its extension names (.png, .jpg/.jpeg), crash-safe."""
    from PIL import Image

    fmt = IMAGE_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise ValueError(f"{path!r}: expected a {'/'.join(IMAGE_FORMATS)} file name")
    with atomic_write(path) as f:
        Image.fromarray(image).save(f, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))


def save_npz(images: np.ndarray, labels: np.ndarray, path: str, **extra: np.ndarray) -> None:
    """Write an ADM-style batch (`arr_0` uint8 NHWC, `arr_1` int64 labels, any `extra` arrays), crash-safe."""
    with atomic_write(path) as f:
        np.savez(f, arr_0=images, arr_1=labels.astype(np.int64), **extra)
