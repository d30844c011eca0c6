"""Session-wide test data for tests/data: an image folder and shards extracted from it with `tiny_vae`."""

import pytest

from tests.helpers import extract_args, make_image_folder, make_latent_dataset, run_extract_cli


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="session")
def extracted(tmp_path_factory, tiny_vae, image_folder):
    """Shards made by the CLI with 2 CPU processes (gloo): shard s written by rank s % 2."""
    out = tmp_path_factory.mktemp("latents2")
    proc = run_extract_cli([*extract_args(image_folder, out, tiny_vae), "--devices", "2"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@pytest.fixture(scope="session")
def extracted_in_process(tmp_path_factory, tiny_vae, image_folder):
    """The same shards made in this process on one CPU device."""
    return make_latent_dataset(tmp_path_factory.mktemp("latents1"), tiny_vae, image_folder)
