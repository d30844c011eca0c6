"""Extracted latent shards (see gspn_gen.data.extract for the layout): meta.json and the dataset over them.

The trainer reads them through `gspn_gen.data.datamodule.LatentDataModule`
(`python train_gen.py fit --config ... --data.root /data/in256`).
Shards are memory-mapped (safetensors `safe_open`, opened lazily in each worker), so a worker reads
only the rows it serves and nothing is loaded up front except the labels.
"""

from __future__ import annotations

import bisect
import json
import os

import torch
from safetensors import safe_open
from torch.utils.data import Dataset

FORMAT = "gspn-gen-latents"
VERSION = 1


def read_meta(root: str) -> dict:
    """Load and check `root/meta.json`; a missing or foreign file raises ValueError."""
    path = os.path.join(root, "meta.json")
    if not os.path.isfile(path):
        raise ValueError(
            f"no meta.json in {root!r}: make latent shards first with `python -m gspn_gen.data.extract "
            f"--images DIR --out {root} --image-size 256 --vae ...` (an unfinished extraction has no meta.json yet; "
            "re-run the same command to resume it)"
        )
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(
            f"{path} is not a {FORMAT} v{VERSION} file (format={meta.get('format')!r}, version={meta.get('version')!r})"
        )
    return meta


class LatentShards(Dataset):
    """Item i -> (latent float32 (C, h, w), label): the image's latent or, at random, its mirror's.

    The item may be an (index, seed) pair (gspn_gen.data.sampler): the seed then decides the flip, so
    the choice follows the data order instead of the worker's random state.
    """

    def __init__(self, root: str, shards: list[dict], random_flip: bool = True):
        self.paths = [os.path.join(root, s["file"]) for s in shards]
        self.random_flip = random_flip
        labels, self.starts = [], [0]
        for path, shard in zip(self.paths, shards):
            if not os.path.isfile(path):
                raise ValueError(f"shard {path} listed in meta.json is missing")
            with safe_open(path, framework="pt") as f:
                labels.append(f.get_tensor("labels"))
            if len(labels[-1]) != shard["count"]:
                raise ValueError(f"shard {path} holds {len(labels[-1])} latents, meta.json says {shard['count']}")
            self.starts.append(self.starts[-1] + shard["count"])
        self.labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)
        self.handles: dict[int, object] = {}  # shard -> safe_open handle, per process

    def __getstate__(self) -> dict:
        # safe_open handles cannot be pickled; each DataLoader worker opens its own.
        return {**self.__dict__, "handles": {}}

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = item if isinstance(item, tuple) else (item, None)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} latents")
        shard = bisect.bisect_right(self.starts, index) - 1
        if shard not in self.handles:
            self.handles[shard] = safe_open(self.paths[shard], framework="pt")  # mmap; keeps no fd open
        if not self.random_flip:
            flip = 0
        else:
            flip = int(torch.randint(2, ())) if seed is None else seed & 1
        latent = self.handles[shard].get_slice("latents")[index - self.starts[shard], flip]  # (C, h, w) fp16
        return latent.float(), int(self.labels[index])
