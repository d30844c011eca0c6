"""CUDA-only tests. Each skips with the reason when the CUDA kernels cannot run here, and FAILS instead
when GSPN_REQUIRE_CUDA=1 (a GPU session must never come back green with its GPU tests skipped).
Fresh tensors are NaN-filled during these tests (torch's deterministic fill), so an output element the
kernels never write cannot pass a comparison.
"""

import functools
import os

import pytest
import torch


@functools.cache
def cuda_unavailable() -> str | None:
    """Why the CUDA kernels cannot run here, or None."""
    if not torch.cuda.is_available():
        return "no CUDA device is visible to PyTorch"
    from gspn_gen.kernels import cupy_backend

    return cupy_backend.unavailable_reason()


@pytest.fixture(autouse=True)
def _cuda_or_skip():
    reason = cuda_unavailable()
    if reason is not None:
        if os.environ.get("GSPN_REQUIRE_CUDA") == "1":
            pytest.fail(f"GSPN_REQUIRE_CUDA=1 but the CUDA kernels cannot run: {reason}")
        pytest.skip(f"needs the CUDA kernels: {reason}")
    deterministic = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(deterministic)
    torch.utils.deterministic.fill_uninitialized_memory = fill
