"""The offline digits extractor: committed weights, accuracy, classify(), and FID that separates data from noise."""

import numpy as np
import pytest
import torch

from fid_eval import build_extractor, compute_stats, frechet_distance
from fid_eval.digits import DEFAULT_WEIGHTS, DigitsCNN, classify
from fid_eval.errors import FidEvalError
from fid_eval.inputs import ArraySource, digits_source
from fid_eval.train_digits import main as train_main


@pytest.fixture(scope="module")
def digits():
    return build_extractor("digits", device="cpu")


def test_committed_weights_are_small_and_load_safely():
    assert DEFAULT_WEIGHTS.stat().st_size < 1_000_000
    state_dict = torch.load(DEFAULT_WEIGHTS, weights_only=True)
    DigitsCNN().load_state_dict(state_dict)
    assert float(state_dict["feature_scale"]) != 1.0  # set by training: E|f|^2 / D = 1 on train


def test_classifier_is_accurate_on_held_out_digits():
    val = digits_source("val")
    labels = classify(val.images)
    assert labels.dtype == np.int64 and labels.shape == (297,)
    assert (labels == val.labels).mean() > 0.97
    # grey (N, H, W) and larger images are accepted too
    assert np.array_equal(classify(val.images[:20, ..., 0]), labels[:20])
    big = np.repeat(np.repeat(val.images[:20], 2, axis=1), 2, axis=2)  # 32x32
    assert (classify(big) == labels[:20]).mean() >= 0.9
    with pytest.raises(FidEvalError, match="uint8"):
        classify(val.images.astype(np.float32))


def test_fid_train_vs_val_far_below_train_vs_noise(digits):
    train = compute_stats(digits_source("train"), digits, batch_size=512, progress=False)
    val = compute_stats(digits_source("val"), digits, batch_size=512, progress=False)
    noise_images = np.random.default_rng(0).integers(0, 256, (500, 16, 16, 1), dtype=np.uint8)
    noise = compute_stats(ArraySource(noise_images), digits, batch_size=512, progress=False)
    fid_val = frechet_distance(train.mu, train.sigma, val.mu, val.sigma)
    fid_noise = frechet_distance(train.mu, train.sigma, noise.mu, noise.sigma)
    assert fid_val < 2.0 and fid_noise > 20 * fid_val


def test_wrong_digits_weights_are_refused(tmp_path):
    torch.save({"body.0.weight": torch.zeros(3, 3)}, tmp_path / "bad.pt")
    with pytest.raises(FidEvalError, match="bad.pt: does not fit the digits classifier"):
        build_extractor("digits", str(tmp_path / "bad.pt"), "cpu")
    with pytest.raises(FidEvalError, match="not found"):
        build_extractor("digits", str(tmp_path / "absent.pt"), "cpu")


def test_training_script_writes_loadable_weights(tmp_path, capsys):
    assert train_main(["--epochs", "1", "--out", str(tmp_path / "w.pt")]) == 0
    assert "val accuracy" in capsys.readouterr().out
    assert build_extractor("digits", str(tmp_path / "w.pt"), "cpu").feature_dim == 64
