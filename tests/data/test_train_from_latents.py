"""ImageNet path end to end on tiny data: extracted VAE latent shards -> train_gen.py fit -> sample.py."""

from __future__ import annotations

import numpy as np
import yaml

from gspn_gen import sample_cli, train_cli
from gspn_gen.checkpoints import read_checkpoint


def test_train_five_steps_from_shards_then_sample(extracted, tmp_path):
    run = tmp_path / "run"
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 5, "default_root_dir": str(run),
                    "enable_progress_bar": False, "enable_model_summary": False, "log_every_n_steps": 1,
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": str(run), "save_top_k": 0, "save_last": True}}]},
        "model": {"model": "GSPN-T/2", "model_args": {"hidden_size": 32, "depth": 2, "num_heads": 2},
                  "optim": {"lr": 1e-3}},
        "data": {"class_path": "gspn_gen.data.datamodule.LatentDataModule",
                 "init_args": {"root": str(extracted), "batch_size": 4, "num_workers": 0}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    train_cli.main(["fit", "--config", str(path)])

    ckpt = read_checkpoint(str(run / "last.ckpt"))
    hp = ckpt["hyper_parameters"]
    meta = yaml.safe_load((extracted / "meta.json").read_text())
    assert ckpt["global_step"] == 5
    assert hp["codec"] == meta["codec"] and hp["codec"]["name"] == "sd-vae"  # the scale travels with it
    assert (hp["num_classes"], hp["in_channels"]) == (3, 4)
    assert hp["class_names"] == meta["class_names"]

    out = tmp_path / "s.npz"
    sample_cli.main(["--ckpt", str(run / "last.ckpt"), "--num-samples", "3", "--steps", "2", "--out", str(out)])
    images = np.load(out)["arr_0"]
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8  # decoded by the VAE to 32 px
