"""LatentDataModule: metadata before setup, memory-mapped shards, flips, workers, DDP sampler swap."""

import json
import pickle

import pytest
import torch
from lightning.pytorch.utilities.data import _update_dataloader
from safetensors.torch import load_file
from torch.utils.data import DistributedSampler, RandomSampler

from gspn_gen.data.datamodule import LatentDataModule
from gspn_gen.data.latents import LatentShards
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
    assert isinstance(loader.sampler, RandomSampler) and loader.drop_last
    batches = list(loader)
    assert len(batches) == len(latents) // 8
    for x, y in batches:
        assert x.shape == (8, 4, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
        for xi, yi in zip(x, y):
            match = ((latents - xi).flatten(2).abs().amax(2) == 0).nonzero()  # (row, image|flip)
            assert len(match) >= 1 and labels[match[0, 0]] == yi
    pickle.dumps(dm.dataset)  # handles opened above must not break pickling for workers


def test_lightning_can_swap_in_a_distributed_sampler(extracted):
    # What Lightning does under DDP (use_distributed_sampler=True): rebuild our loader with its sampler.
    loader = LatentDataModule(str(extracted), batch_size=4, num_workers=0).train_dataloader()
    shares = []
    for rank in range(2):
        sampler = DistributedSampler(loader.dataset, num_replicas=2, rank=rank, shuffle=True, seed=0)
        dl = _update_dataloader(loader, sampler)
        assert dl.sampler is sampler and dl.batch_size == 4 and dl.drop_last
        shares.append(list(sampler))
        assert len(list(dl)) == len(sampler) // 4
    assert set(shares[0] + shares[1]) == set(range(len(loader.dataset)))
