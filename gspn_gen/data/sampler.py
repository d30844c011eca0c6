"""Resumable data order: a run resumed from a checkpoint saved at any step sees the batches an unbroken
run would have seen, on one process or many.

The order of epoch e is a permutation drawn from a generator seeded with (seed, e), so it is a pure
function of those two numbers. Rank r of R takes positions offset + r, offset + r + R, ... where
`offset` counts the samples of the epoch that all ranks together consumed before; the ranks thus
consume a prefix of the permutation, and (seed, epoch, consumed) is the whole state of the data order.
`ResumableLoader` counts the batches it hands out and is a stateful loader in Lightning's sense: the
fit loop stores its `state_dict()` in every checkpoint and gives it back through `load_state_dict()`
before the first batch of a resumed run.

Random augmentation draws from the same epoch generator: with `seeds=True` the sampler yields
(index, seed) pairs, one 63-bit seed per position, and the data set derives its random choices from
that seed (the latents' random flip does), so they too follow the checkpoint and not a worker's RNG.

    loader = train_loader(dataset, batch_size=64, num_workers=4, trainer=trainer)
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

SEED_ENV = "PL_GLOBAL_SEED"  # where Lightning's seed_everything leaves the run's seed, on every rank


def run_seed() -> int:
    """The seed this run was started with (`seed_everything`), the same on every rank; 0 when unset."""
    return int(os.environ.get(SEED_ENV, "0"))


def derive_seed(*values: int) -> int:
    """A 63-bit seed that depends on all `values` (integers of any sign), unrelated for neighbouring ones."""
    words = [int(v) % 2**64 for v in values]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> np.uint64(1))


class EpochSampler(DistributedSampler):
    """This rank's share of the shuffled order of epoch `epoch`, starting after `offset` consumed samples.

    A DistributedSampler subclass only so that Lightning keeps it under DDP instead of wrapping it;
    its own state is `seed`, `epoch` and the one-shot `offset` of the next iteration.
    """

    def __init__(self, size: int, seed: int = 0, num_replicas: int = 1, rank: int = 0, seeds: bool = False):
        if size < num_replicas:
            raise ValueError(f"a data set of {size} items cannot be split across {num_replicas} processes")
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.size = size
        self.seeds = seeds
        self.offset = 0

    def __len__(self) -> int:
        return self.size // self.num_replicas  # a whole epoch, also while a resumed epoch is finished

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.offset = epoch, 0

    def order(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The permutation of `epoch` (all ranks) and, with `seeds`, the augmentation seed of each position."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
        perm = torch.randperm(self.size, generator=g)
        return perm, (torch.randint(0, 2**62, (self.size,), generator=g) if self.seeds else None)

    def __iter__(self):
        offset, self.offset = self.offset, 0
        perm, seeds = self.order(self.epoch)
        count = (self.size - offset) // self.num_replicas  # equal on every rank: DDP steps in lockstep
        take = slice(offset + self.rank, offset + self.rank + count * self.num_replicas, self.num_replicas)
        if seeds is None:
            return iter(perm[take].tolist())
        return zip(perm[take].tolist(), seeds[take].tolist())


class ResumableLoader(DataLoader):
    """A training DataLoader over an `EpochSampler` whose position survives a checkpoint (module docstring)."""

    def __init__(self, dataset: Dataset, batch_size: int, sampler: EpochSampler, **kwargs):
        # Its own generator: iterating never draws from the global RNG, which training steps use.
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                         generator=torch.Generator().manual_seed(derive_seed(sampler.seed, -1)), **kwargs)
        self._consumed = (sampler.epoch, 0)  # (epoch, samples of it consumed by all ranks)

    def __iter__(self):
        return self._batches()  # a generator: the order is read when the first batch is asked for

    def _batches(self):
        sampler = self.sampler
        consumed = sampler.offset
        self._consumed = (sampler.epoch, consumed)
        for batch in super().__iter__():
            consumed = min(consumed + self.batch_size * sampler.num_replicas, sampler.size)
            self._consumed = (sampler.epoch, consumed)
            yield batch

    def state_dict(self) -> dict:
        epoch, consumed = self._consumed
        if epoch != self.sampler.epoch:  # a new epoch was set but has not started
            epoch, consumed = self.sampler.epoch, 0
        return {"seed": self.sampler.seed, "epoch": epoch, "consumed": consumed, "size": self.sampler.size}

    def load_state_dict(self, state: dict) -> None:
        sampler = self.sampler
        sampler.seed, sampler.epoch = int(state["seed"]), int(state["epoch"])
        same_data = int(state.get("size", sampler.size)) == sampler.size
        sampler.offset = min(int(state["consumed"]), sampler.size) if same_data else 0
        self._consumed = (sampler.epoch, sampler.offset)


def train_loader(dataset: Dataset, batch_size: int, num_workers: int = 0, trainer=None, seeds: bool = False,
                 **kwargs) -> ResumableLoader:
    """The resumable, shuffled training loader of `dataset` for this rank of `trainer` (None: one process).

    Drops the last incomplete batch of each epoch (every rank takes the same number of full batches).
    """
    world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    share = len(dataset) // world
    if share < batch_size:
        raise ValueError(f"the data set holds {len(dataset)} items: {share} per process, fewer than "
                         f"batch_size={batch_size}")
    sampler = EpochSampler(len(dataset), run_seed(), num_replicas=world, rank=rank, seeds=seeds)
    return ResumableLoader(dataset, batch_size, sampler, num_workers=num_workers,
                           persistent_workers=num_workers > 0, **kwargs)
