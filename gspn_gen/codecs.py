"""Latent codecs: the map between images in [-1, 1] and the space the generator models.

A codec is rebuilt from a plain spec dict that travels in the latent metadata (`meta.json`) and in
checkpoints, so the VAE path and its scale factor are written down once and never re-typed:

    {"name": "identity"}                                                       pixel space
    {"name": "sd-vae", "path": "stabilityai/sd-vae-ft-ema", "scale": DEFAULT_VAE_SCALE}    SD VAE

`scale` (and the optional `shift`, 0 for SD 1.x VAEs) is applied inside `encode`/`decode`:
z = (mean - shift) * scale. `DEFAULT_VAE_SCALE` is the only place the SD number lives; it is used
when a new spec is made (extraction writes it to meta.json, training copies it to the checkpoint).

Codecs are plain objects, not `nn.Module`s, so a LightningModule holding one does not save VAE
weights in every checkpoint; move them with `codec.to(device)`.
"""

from __future__ import annotations

import json
import os

import torch

DEFAULT_VAE_SCALE = 0.18215  # SD 1.x VAE latent scale (Rombach et al. 2022): unit-variance latents
VAE_INSTALL_HINT = "pip install 'gspn-gen[vae]'"
CODEC_NAMES = ("identity", "sd-vae")


class CodecLoadError(RuntimeError):
    """The codec's weights could not be loaded (offline, wrong directory, bad files)."""


class Codec:
    """Base class: `encode` images in [-1, 1] to model space, `decode` back.

    `channels` is the number of model-space channels (None: identity, any), `downsample` the
    spatial factor between image and model space.
    """

    spec: dict
    channels: int | None
    downsample: int

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Codec:
        return self

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def latent_shape(self, image_size: int, image_channels: int = 3) -> tuple[int, int, int]:
        """(C, h, w) of the model-space tensor for square images of side `image_size`."""
        if image_size % self.downsample:
            raise ValueError(
                f"image size {image_size} is not divisible by the codec's downsample factor {self.downsample}"
            )
        side = image_size // self.downsample
        return (self.channels or image_channels, side, side)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class IdentityCodec(Codec):
    """Pixel space: the model sees the images themselves."""

    def __init__(self, spec: dict):
        self.spec = dict(spec)
        self.channels = spec.get("channels")
        self.downsample = 1

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z.clamp(-1, 1)


class SDVAECodec(Codec):
    """Stable Diffusion's KL autoencoder through `diffusers.AutoencoderKL` (frozen, eval mode).

    `encode` returns the scaled posterior *mean*, not a sample: extraction is then deterministic
    (resume and multi-GPU runs give the same bytes), and for the SD VAE the posterior std is small
    next to the data, so a stored sample would only add fixed noise.
    """

    def __init__(self, spec: dict):
        self.spec = dict(spec)
        self.scale = float(spec["scale"])
        self.shift = float(spec.get("shift", 0.0))
        self.vae = load_vae(spec["path"])
        cfg = self.vae.config
        self.channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> SDVAECodec:
        if dtype is None:
            self.vae.to(device)
        else:
            self.vae.to(device, dtype)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        # images: (N, 3, H, W) in [-1, 1] -> (N, C, H/d, W/d) float32
        param = next(self.vae.parameters())
        dist = self.vae.encode(images.to(param.device, param.dtype)).latent_dist
        return ((dist.mean.float() - self.shift) * self.scale)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        # z: (N, C, h, w) scaled latents -> (N, 3, h*d, w*d) float32 in [-1, 1]
        param = next(self.vae.parameters())
        z = (z.float() / self.scale + self.shift).to(param.device, param.dtype)
        return self.vae.decode(z).sample.float().clamp(-1, 1)


def sd_vae_spec(path: str, scale: float | None = None) -> dict:
    """A new SD VAE spec; a local directory is stored as an absolute path."""
    if os.path.isdir(path):
        path = os.path.abspath(path)
    return {"name": "sd-vae", "path": path, "scale": DEFAULT_VAE_SCALE if scale is None else float(scale)}


def codec_identity(spec: dict | None) -> dict:
    """What a codec is, without where it is stored: that may change between machines, what it is may not."""
    return {k: v for k, v in (spec or {"name": "identity"}).items() if k != "path"}


def _looks_local(path: str) -> bool:
    """A local path rather than a hub id ("org/name")."""
    return os.path.exists(path) or os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") != 1


VAE_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def check_vae_source(path: str) -> None:
    """Without loading it: a local VAE directory exists and holds a diffusers AutoencoderKL (config and
    weights); a hub id ("org/name") is accepted as given. CodecLoadError says what is wrong."""
    if not _looks_local(path):
        return
    if not os.path.isdir(path):
        raise CodecLoadError(f"VAE directory {path!r} does not exist")
    try:
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise CodecLoadError(f"{path!r} holds no readable config.json ({type(e).__name__}): not a VAE directory "
                             "written by save_pretrained or huggingface-cli download") from None
    kind = config.get("_class_name") if isinstance(config, dict) else None
    if kind != "AutoencoderKL":
        raise CodecLoadError(f"{path!r} holds a {kind or 'model without _class_name'}, not an AutoencoderKL VAE")
    if not any(os.path.isfile(os.path.join(path, name)) for name in VAE_WEIGHTS):
        raise CodecLoadError(f"{path!r} holds a VAE config but no weights ({' or '.join(VAE_WEIGHTS)})")


def load_vae(path: str):
    """`AutoencoderKL.from_pretrained(path)` in eval mode, with errors that say how to fix them."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as err:
        raise ImportError(f"the SD VAE codec needs diffusers: {VAE_INSTALL_HINT}") from err
    check_vae_source(path)
    try:
        vae = AutoencoderKL.from_pretrained(path, low_cpu_mem_usage=False)  # no `accelerate` nag
    except Exception as err:  # diffusers/huggingface_hub raise many types (OSError, HTTP, validation)
        if os.path.isdir(path):
            raise CodecLoadError(
                f"could not load a VAE from directory {path!r} (expected config.json and "
                f"diffusion_pytorch_model.safetensors, as written by save_pretrained): {err}"
            ) from err
        raise CodecLoadError(
            f"could not load VAE {path!r} (offline?): download it on a machine with internet "
            f"(`huggingface-cli download {path} --local-dir DIR`), copy DIR here and pass it as the "
            f"VAE path (e.g. --vae DIR). Cause: {type(err).__name__}: {err}"
        ) from err
    return vae.eval().requires_grad_(False)


def build_codec(spec: dict) -> Codec:
    """Build the codec a spec describes; unknown names or missing keys raise ValueError."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(f"codec spec must be a dict with a 'name' key, got {spec!r}")
    name = spec["name"]
    if name == "identity":
        return IdentityCodec(spec)
    if name == "sd-vae":
        missing = [k for k in ("path", "scale") if k not in spec]
        if missing:
            raise ValueError(f"sd-vae codec spec needs keys {missing}, got {spec!r}")
        if not float(spec["scale"]) > 0:
            raise ValueError(f"sd-vae codec scale must be > 0, got {spec['scale']!r}")
        return SDVAECodec(spec)
    raise ValueError(f"unknown codec {name!r}; known codecs: {', '.join(CODEC_NAMES)}")
