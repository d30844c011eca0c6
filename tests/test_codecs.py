"""Codecs: identity, the SD VAE through diffusers (a tiny random one), and their error messages."""

import sys

import pytest
import torch

from gspn_gen.codecs import DEFAULT_VAE_SCALE, CodecLoadError, build_codec, sd_vae_spec


def test_identity_codec_is_pixel_space():
    codec = build_codec({"name": "identity"})
    x = torch.rand(2, 1, 8, 8) * 4 - 2
    assert codec.encode(x) is x
    assert codec.decode(x).min() >= -1 and codec.decode(x).max() <= 1
    assert codec.downsample == 1 and codec.channels is None
    assert codec.latent_shape(16, image_channels=1) == (1, 16, 16)


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"name": "vqgan"}, "known codecs: identity, sd-vae"),
        ({"path": "x"}, "'name' key"),
        ({"name": "sd-vae", "path": "x"}, "needs keys ['scale']"),
        ({"name": "sd-vae", "path": "x", "scale": 0}, "scale must be > 0"),
    ],
)
def test_bad_specs_are_rejected(spec, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        build_codec(spec)


def test_sd_vae_codec_encodes_scaled_posterior_mean(tiny_vae):
    spec = sd_vae_spec(tiny_vae)
    assert spec == {"name": "sd-vae", "path": tiny_vae, "scale": DEFAULT_VAE_SCALE}
    codec = build_codec(spec)
    assert (codec.channels, codec.downsample) == (4, 2)
    assert codec.latent_shape(32) == (4, 16, 16)
    with pytest.raises(ValueError, match="not divisible"):
        codec.latent_shape(33)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = codec.encode(x)
    assert z.shape == (2, 4, 16, 16) and z.dtype == torch.float32
    with torch.no_grad():
        mean = codec.vae.encode(x).latent_dist.mean
        pixels = codec.vae.decode(z / DEFAULT_VAE_SCALE).sample.clamp(-1, 1)
    torch.testing.assert_close(z, mean * DEFAULT_VAE_SCALE)
    torch.testing.assert_close(codec.encode(x), z, rtol=0, atol=0)  # deterministic
    torch.testing.assert_close(codec.decode(z), pixels)
    half = build_codec(sd_vae_spec(tiny_vae, scale=0.5))
    torch.testing.assert_close(half.encode(x), mean * 0.5)


def test_missing_vae_directory_is_named(tmp_path):
    with pytest.raises(CodecLoadError, match="does not exist"):
        build_codec(sd_vae_spec(str(tmp_path / "nope")))
    with pytest.raises(CodecLoadError, match="config.json"):
        build_codec(sd_vae_spec(str(tmp_path)))


def test_offline_hub_id_says_how_to_fix_it(monkeypatch):
    from diffusers import AutoencoderKL

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(AutoencoderKL, "from_pretrained", offline)
    with pytest.raises(CodecLoadError) as info:
        build_codec(sd_vae_spec("stabilityai/sd-vae-ft-ema"))
    assert "offline?" in str(info.value)
    assert "huggingface-cli download stabilityai/sd-vae-ft-ema" in str(info.value)
    assert "--vae DIR" in str(info.value)


def test_missing_diffusers_names_the_extra(monkeypatch, tiny_vae):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ImportError, match=r"pip install 'gspn-gen\[vae\]'"):
        build_codec(sd_vae_spec(tiny_vae))
