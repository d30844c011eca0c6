"""Session-wide test data for tests/data: a tiny VAE, an image folder, and shards extracted from them."""

import importlib.util
import sys
from pathlib import Path

import pytest

# fixtures.py is loaded by path under a unique name, so it cannot collide with another tests/*/fixtures.py.
_spec = importlib.util.spec_from_file_location("gspn_data_fixtures", Path(__file__).with_name("fixtures.py"))
fx = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = fx
_spec.loader.exec_module(fx)


@pytest.fixture(scope="session")
def data_fixtures():
    return fx


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory):
    return fx.make_tiny_vae(tmp_path_factory.mktemp("vae"))


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    return fx.make_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="session")
def extracted(tmp_path_factory, tiny_vae, image_folder):
    """Shards made by the CLI with 2 CPU processes (gloo): shard s written by rank s % 2."""
    out = tmp_path_factory.mktemp("latents2")
    proc = fx.run_extract_cli([*fx.extract_args(image_folder, out, tiny_vae), "--devices", "2"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@pytest.fixture(scope="session")
def extracted_in_process(tmp_path_factory, tiny_vae, image_folder):
    """The same shards made in this process on one CPU device."""
    return fx.make_latent_dataset(tmp_path_factory.mktemp("latents1"), tiny_vae, image_folder)
