"""LatentDataModule: metadata before setup, memory-mapped shards, flips, workers, resumable DDP shares."""

import json
import pickle
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DistributedSampler

from gspn_gen.data.datamodule import LatentDataModule
from gspn_gen.data.latents import LatentShards
from gspn_gen.data.sampler import EpochSampler
from tests import helpers


def stored(root):
    meta = json.loads((root / "meta.json").read_text())
    parts = [load_file(root / s["file"]) for s in meta["shards"]]
    return meta, torch.cat([p["latents"] for p in parts]).float(), torch.cat([p["labels"] for p in parts])


def test_contract_attributes_come_before_setup(extracted):
    dm = LatentDataModule(str(extracted))
    assert (dm.num_classes, dm.channels, dm.size) == (3, 4, 16)
    assert dm.class_names == list(helpers.CLASSES)
    assert dm.codec == stored(extracted)[0]["codec"] and dm.codec["name"] == "sd-vae"
    assert dm.dataset is None


def test_missing_meta_says_what_to_run(tmp_path):
    with pytest.raises(ValueError, match="no meta.json.*gspn_gen.data.extract"):
        LatentDataModule(str(tmp_path))


def test_items_are_the_image_or_its_mirror(extracted):
    meta, latents, labels = stored(extracted)
    ds = LatentShards(str(extracted), meta["shards"], random_flip=False)
    assert len(ds) == len(latents) and torch.equal(ds.labels, labels)
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.dtype == torch.float32 and y == labels[i]
        assert torch.equal(x, latents[i, 0])
    flipping = LatentShards(str(extracted), meta["shards"])
    seen = {int(torch.equal(flipping[7][0], latents[7, 1])) for _ in range(64)}
    assert seen == {0, 1}
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_batches_match_the_stored_latents(extracted):
    _, latents, labels = stored(extracted)
    dm = LatentDataModule(str(extracted), batch_size=8, num_workers=2)
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, EpochSampler) and loader.drop_last
    batches = list(loader)
    assert len(batches) == len(latents) // 8
    for x, y in batches:
        assert x.shape == (8, 4, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
        for xi, yi in zip(x, y):
            match = ((latents - xi).flatten(2).abs().amax(2) == 0).nonzero()  # (row, image|flip)
            assert len(match) >= 1 and labels[match[0, 0]] == yi
    pickle.dumps(dm.dataset)  # handles opened above must not break pickling for workers


def test_ddp_ranks_take_disjoint_shares_with_flips_that_follow_the_order(extracted):
    """Each rank's loader serves its share of one shuffled order (a DistributedSampler, so Lightning keeps
    it); the flips come with the order, so an epoch read twice, or resumed, is the same batches."""
    _, latents, _ = stored(extracted)
    shares, flips = [], []
    for rank in range(2):
        dm = LatentDataModule(str(extracted), batch_size=4, num_workers=0)
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        loader = dm.train_dataloader()
        assert isinstance(loader.sampler, DistributedSampler) and len(loader) == (len(latents) // 2) // 4
        items = list(loader.sampler)
        shares.append([i for i, _ in items])
        first, again = list(loader), list(loader)
        assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
        for (index, seed), x in zip(items, torch.cat([x for x, _ in first])):
            assert torch.equal(x, latents[index, seed & 1])  # the flip the order's seed chose
            flips.append(seed & 1)
    assert not set(shares[0]) & set(shares[1]) and len(shares[0]) == len(shares[1]) == len(latents) // 2
    assert set(flips) == {0, 1}
