"""Fixtures of the kernel tests: the CPU emulation of the CUDA kernels (helpers: emulation.py).

Every build of emulation.BUILDS starts at the first request, two at a time under `nice`, and each
fixture waits for the one it needs.
"""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tests.kernels.emulation import BUILDS, NO_GXX, Emulation, build, emulation_from, point_backend_at


@pytest.fixture(scope="session")
def emulation_builds(tmp_path_factory):
    """name -> Future of the built file; every build starts at the first request, two at a time."""
    if NO_GXX:
        pytest.skip("the CPU emulation of the CUDA kernels needs g++")
    root = tmp_path_factory.mktemp("cuda_emulation")
    pool = ThreadPoolExecutor(2)
    futures = {name: pool.submit(build, name, root) for name in BUILDS}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture
def emulation(emulation_builds, monkeypatch) -> Emulation:
    """The emulation library, with cupy_backend pointed at it and outputs poisoned (torch.empty -> NaN)."""
    emu = emulation_from(emulation_builds, "lib")
    point_backend_at(monkeypatch, emu)
    emu.reset()
    deterministic = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield emu
    torch.use_deterministic_algorithms(deterministic)
    torch.utils.deterministic.fill_uninitialized_memory = fill
