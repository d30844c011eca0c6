"""Statistics files, the content-hash cache, and evaluate() with a cheap stand-in extractor."""

import numpy as np
import pytest
import torch

from fid_eval import evaluate
from fid_eval.errors import FidEvalError
from fid_eval.features import Extractor
from fid_eval.inputs import ArraySource
from fid_eval.metrics import feature_stats, frechet_distance
from fid_eval.stats import Stats, cached_stats, compute_stats, default_cache_dir, load_stats, save_stats


class PixelExtractor(Extractor):
    """Stand-in network: features = 4x4 average-pooled grey pixels (16-d), logits = first 5 of them."""

    name, fingerprint, weights_path, feature_dim, num_classes = "pixels", "pixels-v1", "-", 16, 5

    def __init__(self):
        super().__init__(torch.device("cpu"))
        self.calls = 0

    def _forward(self, images):
        self.calls += 1
        x = torch.nn.functional.adaptive_avg_pool2d(images.float().mean(1, keepdim=True), 4) / 255  # (B, 1, 4, 4)
        return x.flatten(1), x.flatten(1)[:, :5] * 10


def _source(n=40, seed=0, name="array"):
    rng = np.random.default_rng(seed)
    return ArraySource(rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), rng.integers(0, 5, n), name=name)


@pytest.mark.parametrize("suffix", [".npz", ".pt"])
def test_save_load_roundtrip(tmp_path, suffix):
    stats = compute_stats(_source(), PixelExtractor(), batch_size=7, progress=False)
    save_stats(stats, tmp_path / f"s{suffix}")
    back = load_stats(tmp_path / f"s{suffix}")
    assert np.array_equal(back.mu, stats.mu) and np.array_equal(back.sigma, stats.sigma)
    assert np.array_equal(back.features, stats.features) and np.array_equal(back.logits, stats.logits)
    assert back.num_images == 40 and back.fingerprint == "pixels-v1"
    assert list(tmp_path.iterdir()) == [tmp_path / f"s{suffix}"]  # no temp file left behind


def test_compute_stats_match_features():
    stats = compute_stats(_source(), PixelExtractor(), batch_size=16, progress=False)
    mu, sigma = feature_stats(stats.features)
    assert stats.features.shape == (40, 16) and np.allclose(stats.mu, mu) and np.allclose(stats.sigma, sigma)


def test_cache_featurises_a_reference_once(tmp_path):
    ext = PixelExtractor()
    first = cached_stats(_source(), ext, tmp_path, batch_size=16, progress=False)
    calls = ext.calls
    again = cached_stats(_source(name="same images, other name"), ext, tmp_path, progress=False)
    assert ext.calls == calls and np.array_equal(again.features, first.features)
    cached_stats(_source(seed=1), ext, tmp_path, progress=False)  # other content: another entry
    assert ext.calls > calls and len(list(tmp_path.glob("*.npz"))) == 2


def test_corrupt_cache_entry_is_recomputed(tmp_path, capsys):
    ext = PixelExtractor()
    cached_stats(_source(), ext, tmp_path, progress=False)
    (entry,) = tmp_path.glob("*.npz")
    entry.write_bytes(b"garbage")
    stats = cached_stats(_source(), ext, tmp_path, progress=False)
    assert stats.num_images == 40 and "recomputing" in capsys.readouterr().err


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("GSPN_FID_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("GSPN_FID_CACHE")
    assert default_cache_dir().parts[-3:] == (".cache", "gspn_gen", "fid_stats")


def test_evaluate_reports_every_metric(tmp_path):
    report = evaluate(_source(), _source(seed=1), extractor=PixelExtractor(), cache_dir=tmp_path, progress=False,
                      isc_splits=4, kid_subsets=3)
    m = report["metrics"]
    assert set(m) == {"fid", "isc_mean", "isc_std", "kid_mean", "kid_std", "precision", "recall"}
    assert report["settings"]["kid_subset_size"] == 40 and report["ref"]["num_images"] == 40
    assert 0 <= m["precision"] <= 1 and m["fid"] > 0


def test_statistics_file_as_reference_gives_the_same_fid(tmp_path):
    ext = PixelExtractor()
    save_stats(compute_stats(_source(seed=1), ext, progress=False), tmp_path / "ref.npz")
    direct = evaluate(_source(), _source(seed=1), "fid,kid", ext, use_cache=False, progress=False)
    via_file = evaluate(_source(), str(tmp_path / "ref.npz"), "fid,kid", ext, progress=False)
    assert via_file["metrics"] == direct["metrics"]


def test_foreign_or_partial_statistics_are_refused(tmp_path):
    ext = PixelExtractor()
    stats = compute_stats(_source(), ext, progress=False)
    other = Stats(stats.mu, stats.sigma, 40, meta={"extractor": "digits-cnn-0123", "source": "o.npz"})
    with pytest.raises(FidEvalError, match="made by digits-cnn-0123"):
        evaluate(_source(), other, "fid", ext, progress=False)
    only_mu_sigma = Stats(stats.mu, stats.sigma, 40, meta={"extractor": "pixels-v1", "source": "m.npz"})
    with pytest.raises(FidEvalError, match="KID needs the reference's features"):
        evaluate(_source(), only_mu_sigma, "fid,kid", ext, progress=False)
    no_record = Stats(stats.mu, stats.sigma, 40, meta={"source": "foreign.npz"})
    with pytest.raises(FidEvalError, match="do not say which extractor"):
        evaluate(_source(), no_record, "fid", ext, progress=False)
    with pytest.raises(FidEvalError, match="need a reference"):
        evaluate(_source(), None, "fid", ext, progress=False)


def test_fid_only_needs_no_reference_features(tmp_path):
    ext = PixelExtractor()
    ref = compute_stats(_source(seed=1), ext, progress=False)
    report = evaluate(_source(), Stats(ref.mu, ref.sigma, 40, meta={"extractor": "pixels-v1"}), "fid", ext,
                      progress=False)
    sample = compute_stats(_source(), ext, progress=False)
    assert report["metrics"]["fid"] == pytest.approx(frechet_distance(sample.mu, sample.sigma, ref.mu, ref.sigma))
