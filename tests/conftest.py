"""Session fixtures shared by several test folders (helpers: tests/helpers.py)."""

import pytest

from tests.helpers import make_tiny_vae


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory) -> str:
    """A random diffusers AutoencoderKL saved to a directory (4 latent channels, downsampling 2)."""
    return make_tiny_vae(tmp_path_factory.mktemp("vae"))
