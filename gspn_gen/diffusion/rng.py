"""Per-sample random streams: sample i's noise depends only on (seed, i).

A 50K-sample FID run is then reproducible and resumable whatever the batch size, the GPU count or
the device (EDM's `StackedRandomGenerator` habit). Each sample owns a CPU `torch.Generator` whose seed
is the child `index` of numpy's `SeedSequence(seed)`, so neighbouring (seed, index) pairs give
unrelated streams. Noise is drawn on the CPU in float32 and then moved, so it is bitwise the same on
every device.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def sample_seed(seed: int, index: int) -> int:
    """64-bit generator seed for sample `index` of run `seed` (SeedSequence child `index`)."""
    state = np.random.SeedSequence(seed, spawn_key=(index,)).generate_state(1, np.uint64)
    return int(state[0])


class PerSampleRNG:
    """One independent random stream per sample, keyed by (seed, indices[i]).

    `randn(shape)` returns (N, *shape) float32 on `device`; successive calls advance every stream, so
    the k-th call gives sample i the same values whichever batch it is in.
    """

    def __init__(
        self,
        seed: int,                              # run seed, >= 0
        indices: Sequence[int] | torch.Tensor,  # global sample index of each batch row, >= 0
        device: torch.device | str = "cpu",     # where the noise is returned
    ):
        if isinstance(indices, torch.Tensor):
            if indices.dim() != 1:
                raise ValueError(f"indices must be 1-D, got shape {tuple(indices.shape)}")
            indices = indices.tolist()
        indices = [int(i) for i in indices]
        if int(seed) != seed or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if any(i < 0 for i in indices):
            raise ValueError(f"indices must be non-negative, got min {min(indices)}")
        self.seed = int(seed)
        self.indices = indices
        self.device = torch.device(device)
        self.generators = [torch.Generator().manual_seed(sample_seed(self.seed, i)) for i in indices]

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: Sequence[int]) -> torch.Tensor:
        """Standard normal noise (N, *shape), float32, one row per stream."""
        shape = tuple(int(s) for s in shape)
        rows = [torch.randn(shape, generator=g, dtype=torch.float32) for g in self.generators]
        if not rows:
            return torch.empty((0, *shape), dtype=torch.float32, device=self.device)
        return torch.stack(rows).to(self.device)
