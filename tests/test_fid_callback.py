"""FIDCallback: FID of EMA samples logged to metrics.csv and TensorBoard during a real (tiny) training run."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
import yaml

from gspn_gen import train_cli
from gspn_gen.fid_callback import FIDCallback


def _config(tmp_path, every: int, max_steps: int) -> str:
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": max_steps, "default_root_dir": str(tmp_path),
            "limit_train_batches": 2, "limit_val_batches": 0, "log_every_n_steps": 1, "enable_progress_bar": False,
            "enable_model_summary": False, "enable_checkpointing": False,
            "callbacks": [{"class_path": "gspn_gen.fid_callback.FIDCallback",
                           "init_args": {"every_n_steps": every, "num_samples": 20, "ref": "digits:val",
                                         "extractor": "digits", "cfg_scale": 2.0, "steps": 2, "batch_size": 8,
                                         "cache_dir": str(tmp_path / "cache")}}],
        },
        "model": {"model": "GSPN-T/2", "model_args": {"hidden_size": 32, "depth": 2, "num_heads": 2},
                  "optim": {"lr": 1e-3}, "ema_args": {"decay": 0.9}, "grids": {"every": 0}},
        "data": {"class_path": "gspn_gen.data.datamodule.DigitsDataModule",
                 "init_args": {"image_size": 8, "batch_size": 8}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_fid_series_in_metrics_csv_and_tensorboard(tmp_path):
    train_cli.main(["fit", "--config", _config(tmp_path, every=2, max_steps=5)])
    with open(tmp_path / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("eval/fid")]
    # every 2 steps, and once more after the last step (5)
    assert [int(r["step"]) for r in rows] == [2, 4, 5]
    for r in rows:
        assert float(r["eval/fid"]) > 0 and 0 <= float(r["eval/class_agreement"]) <= 1
        assert float(r["eval/seconds"]) > 0
    assert list((tmp_path / "cache").glob("*.npz")), "reference statistics not cached"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/fid")] == [2, 4, 5]


def test_scoring_leaves_the_global_rng_alone(tmp_path):
    from gspn_gen.lit import GenerationModule

    module = GenerationModule(model="GSPN-T/2", model_args={"hidden_size": 32, "depth": 2, "num_heads": 2},
                              input_size=8)
    callback = FIDCallback(num_samples=10, ref="digits:val", extractor="digits", steps=1, cache_dir=str(tmp_path))
    callback.on_fit_start(None, module)
    state = torch.get_rng_state()
    first = callback.score(module)
    assert torch.equal(torch.get_rng_state(), state)
    assert callback.score(module)["eval/fid"] == first["eval/fid"]  # fixed seed: same samples, same FID


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="every_n_steps must be >= 1, got 0"):
        FIDCallback(every_n_steps=0)


def _tiny_module():
    from gspn_gen.lit import GenerationModule

    torch.manual_seed(0)
    return GenerationModule(model="GSPN-T/2", model_args={"hidden_size": 32, "depth": 2, "num_heads": 2},
                            input_size=8)


def test_no_evaluation_of_the_start_step_with_accumulation_or_on_resume(monkeypatch):
    from types import SimpleNamespace

    def run(start, steps_of_micro_batches):
        callback, scored = FIDCallback(every_n_steps=2), []
        monkeypatch.setattr(callback, "_evaluate", lambda trainer, module: scored.append(trainer.global_step))
        trainer = SimpleNamespace(global_step=start)
        callback.on_train_start(trainer, None)
        for step in steps_of_micro_batches:  # global_step as each micro-batch ends (accumulate 2: each twice)
            trainer.global_step = step
            callback.on_train_batch_end(trainer, None, None, None, 0)
        callback.on_train_end(trainer, None)
        return scored

    assert run(0, [0, 1, 1, 2, 2, 3]) == [2, 3]  # not the untrained model at step 0, once per step
    assert run(4, [4, 5, 5, 6, 6]) == [6]         # resumed at step 4, scored before the checkpoint


def test_stored_statistics_serve_only_the_metrics_they_hold(tmp_path, monkeypatch):
    from fid_eval.stats import Stats
    from tests.fid_eval.test_fid_adm import TinyInception, _images

    monkeypatch.setattr("fid_eval.build_extractor", lambda *a: TinyInception())
    rng = np.random.default_rng(0)
    ref = tmp_path / "VIRTUAL_ref.npz"  # an ADM reference batch with mu/sigma but no mu_s/sigma_s
    np.savez(ref, arr_0=_images(30, 1), mu=rng.standard_normal(12), sigma=np.eye(12))
    module = _tiny_module()

    fid_only = FIDCallback(num_samples=10, ref=str(ref), extractor="inception", metrics="fid", steps=1,
                           cache_dir=str(tmp_path / "cache"))
    fid_only.on_fit_start(None, module)
    assert isinstance(fid_only._reference, Stats) and not (tmp_path / "cache").exists()  # stored, not featurised

    callback = FIDCallback(num_samples=10, ref=str(ref), extractor="inception", metrics="fid,sfid", steps=1,
                           cache_dir=str(tmp_path / "cache"))
    callback.on_fit_start(None, module)
    values = callback.score(module)
    assert np.isfinite(values["eval/fid"]) and np.isfinite(values["eval/sfid"])
    assert list((tmp_path / "cache").glob("*.npz"))  # featurised the batch's images for sFID


def test_bad_metric_names_are_refused_at_fit_start(tmp_path):
    callback = FIDCallback(ref="digits:val", extractor="digits", metrics="fid,fdi", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"unknown metrics \['fdi'\].*fid, sfid, isc, kid, prc"):
        callback.on_fit_start(None, _tiny_module())


def test_guidance_without_a_null_class_is_refused_at_fit_start(tmp_path):
    from gspn_gen.lit import GenerationModule

    module = GenerationModule(model="GSPN-T/2", input_size=8,
                              model_args={"hidden_size": 32, "depth": 2, "num_heads": 2, "class_dropout_prob": 0.0})
    callback = FIDCallback(ref="digits:val", extractor="digits", cfg_scale=2.0, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"FIDCallback: --cfg-scale 2: .*no null class"):
        callback.on_fit_start(None, module)
    assert not list(tmp_path.iterdir()), "the reference statistics were computed before the refusal"
