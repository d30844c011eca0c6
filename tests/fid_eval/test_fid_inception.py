"""Inception through torch-fidelity's real loading path, with a random weights file the test writes."""

import io
from unittest import mock

import numpy as np
import pytest
import torch

from fid_eval import evaluate
from fid_eval.__main__ import main
from fid_eval.errors import FidEvalError
from fid_eval.extractors import build_extractor
from fid_eval.inception import (
    SPATIAL_CHANNELS,
    SPATIAL_MODULE,
    WEIGHTS_FILE,
    default_weights_path,
    spatial_features,
)


def _random_inception_state_dict() -> dict:
    """A state_dict with inception-v3-compat's exact keys and shapes, random values (seeded)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    torch.manual_seed(0)
    with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None):
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)
    return net.state_dict()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(_random_inception_state_dict(), path)
    return path


@pytest.fixture(scope="module")
def inception(weights):
    return build_extractor("inception", str(weights), "cpu")


@pytest.fixture(autouse=True)
def no_torch_hub_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # the default location is empty


def test_missing_weights_fail_before_any_network_or_download(capsys, monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    built = []
    monkeypatch.setattr(tf_inception, "FeatureExtractorInceptionV3", lambda *a, **k: built.append(a))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("downloaded"))
    assert default_weights_path().name == WEIGHTS_FILE and "torch_home" in str(default_weights_path())
    with pytest.raises(FidEvalError, match=rf"not found at .*{WEIGHTS_FILE}.*--weights PATH"):
        build_extractor("inception")
    rc = main(["--samples", "digits:val", "--ref", "digits:train", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "hub/checkpoints" in err and "Traceback" not in err
    assert built == []


# torch-fidelity's converter of the TF graph's weights (toshas/torch-fidelity, utils/util_convert_inception_weights.py)
# maps ADM's sFID layer, the TF graph's "mixed_6/conv" (FID_SPATIAL_NAME "mixed_6/conv:0" in ADM's evaluator), to:
TORCH_FIDELITY_MIXED_6_CONV = {"mixed_6/conv/conv2d_params": "Mixed_6d.branch1x1.conv",
                               "mixed_6/conv/batchnorm": "Mixed_6d.branch1x1.bn"}


def test_sfid_reads_the_module_torch_fidelity_maps_mixed_6_conv_to(inception):
    assert SPATIAL_MODULE == "Mixed_6d.branch1x1"
    assert {name.rsplit(".", 1)[0] for name in TORCH_FIDELITY_MIXED_6_CONV.values()} == {SPATIAL_MODULE}
    keys = inception.net.state_dict().keys()
    assert all(f"{name}.weight" in keys for name in TORCH_FIDELITY_MIXED_6_CONV.values())
    # The spatial features are that module's output, and no other module's: every module's output is
    # captured in one forward (copied: ReLUs work in place), and only that map among the 17x17 ones gives
    # the features the extractor returned -- and the block Mixed_6d's, which concatenates it first.
    outputs = {}
    hooks = [module.register_forward_hook(lambda m, i, out, name=name: outputs.__setitem__(name, out.clone()))
             for name, module in inception.net.named_modules() if name]
    try:
        _, _, spatial = inception(np.random.default_rng(1).integers(0, 256, (2, 24, 20, 3), dtype=np.uint8))
    finally:
        for hook in hooks:
            hook.remove()
    maps = {name: out for name, out in outputs.items()
            if torch.is_tensor(out) and out.ndim == 4 and out.shape[1] >= SPATIAL_CHANNELS and out.shape[2:] == (17, 17)}
    assert {"Mixed_6b.branch1x1", "Mixed_6d.branch_pool", "Mixed_6d.branch7x7_3", "Mixed_6e.branch1x1"} <= set(maps)
    same = [name for name, out in maps.items() if np.array_equal(spatial_features(out).cpu().numpy(), spatial)]
    assert sorted(same) == ["Mixed_6d", SPATIAL_MODULE]


def test_features_from_a_random_weights_file(inception):
    images = np.random.default_rng(0).integers(0, 256, (2, 24, 20, 3), dtype=np.uint8)
    features, logits, spatial = inception(images)
    assert features.shape == (2, 2048) and logits.shape == (2, 1008) and spatial.shape == (2, 2023)
    assert np.isfinite(features).all() and np.isfinite(logits).all() and np.isfinite(spatial).all()
    assert (spatial >= 0).all() and spatial.std() > 0  # after Mixed_6d.branch1x1's ReLU, as ADM's mixed_6/conv:0
    assert not inception.official and "not comparable" in inception.note
    assert inception.fingerprint.startswith("inception-v3-compat-")


def test_wrongly_shaped_weights_are_refused(tmp_path):
    state_dict = _random_inception_state_dict()
    state_dict["fc.weight"] = torch.zeros(10, 2048)
    torch.save(state_dict, tmp_path / "wrong.pth")
    with pytest.raises(FidEvalError, match=r"wrong.pth: does not fit inception-v3-compat .*fc\.weight"):
        build_extractor("inception", str(tmp_path / "wrong.pth"), "cpu")
    del state_dict["fc.weight"]
    torch.save(state_dict, tmp_path / "missing.pth")
    with pytest.raises(FidEvalError, match="does not fit inception-v3-compat .*Missing key"):
        build_extractor("inception", str(tmp_path / "missing.pth"), "cpu")


def test_unreadable_weights_are_refused(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(FidEvalError, match="junk.pth: not a readable PyTorch weights file"):
        build_extractor("inception", str(tmp_path / "junk.pth"), "cpu")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(FidEvalError, match="expected a state_dict"):
        build_extractor("inception", str(tmp_path / "tensor.pth"), "cpu")


def test_adm_reference_batch_uses_its_stored_mu_sigma(tmp_path, inception, monkeypatch):
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(2048), np.eye(2048)
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8), mu=mu, sigma=sigma)
    np.savez(tmp_path / "samples.npz", arr_0=rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8))
    seen = []  # the 2048-d FID itself is tested in test_fid_metrics; here: which statistics reach it
    monkeypatch.setattr("fid_eval.evaluation.frechet_distance", lambda *stats: seen.append(stats) or 1.0)
    report = evaluate(str(tmp_path / "samples.npz"), str(tmp_path / "ref.npz"), "fid", inception,
                      cache_dir=tmp_path / "cache", progress=False)
    (sample_mu, _, ref_mu, ref_sigma), = seen
    assert np.array_equal(ref_mu, mu) and np.array_equal(ref_sigma, sigma) and sample_mu.shape == (2048,)
    assert report["ref"]["fid_statistics"] == "stored mu/sigma of the reference batch"
    assert not (tmp_path / "cache").exists()  # the reference images were never featurised
    assert any("FID-0.002K" in n for n in report["notes"])
