"""Latent extraction: shard contents, flips, the corrupt-file report, resume, several processes, errors."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from gspn_gen.codecs import DEFAULT_VAE_SCALE, build_codec, sd_vae_spec
from gspn_gen.data.extract import main
from gspn_gen.data.images import ImageFolderDataset
from tests import helpers


def load_shards(root):
    meta = json.loads((root / "meta.json").read_text())
    parts = [load_file(root / s["file"]) for s in meta["shards"]]
    return meta, {k: torch.cat([p[k] for p in parts]) for k in ("latents", "labels", "indices")}


def test_meta_describes_the_shards(extracted, image_folder, tiny_vae):
    meta, tensors = load_shards(extracted)
    n_good = sum(helpers.PER_CLASS)
    assert meta["codec"] == {"name": "sd-vae", "path": tiny_vae, "scale": DEFAULT_VAE_SCALE}
    assert (meta["image_size"], meta["latent_shape"], meta["shard_size"]) == (32, [4, 16, 16], 8)
    assert meta["class_names"] == list(helpers.CLASSES) and meta["num_classes"] == 3
    assert (meta["num_images"], meta["num_latents"], meta["num_failed"]) == (n_good + 1, n_good, 1)
    assert meta["class_counts"] == list(helpers.PER_CLASS)
    assert [s["file"] for s in meta["shards"]] == [f"shard-{i:05d}.safetensors" for i in range(5)]
    assert sum(s["count"] for s in meta["shards"]) == n_good
    assert sorted(p.name for p in extracted.iterdir()) == sorted(
        ["meta.json", "report.json"] + [s["file"] for s in meta["shards"]]
    )  # no temp files left behind
    assert tensors["latents"].shape == (n_good, 2, 4, 16, 16) and tensors["latents"].dtype == torch.float16


def test_shards_hold_each_good_image_and_its_mirror(extracted, image_folder, tiny_vae):
    _, tensors = load_shards(extracted)
    ds = ImageFolderDataset(str(image_folder), 32)
    good = [i for i, (path, _) in enumerate(ds.samples) if path != helpers.CORRUPT]
    assert tensors["indices"].tolist() == good
    assert tensors["labels"].tolist() == [ds.samples[i][1] for i in good]
    codec = build_codec(sd_vae_spec(tiny_vae))
    x = torch.stack([ds[i][0] for i in good])
    expected = torch.stack([codec.encode(x), codec.encode(x.flip(-1))], dim=1)
    torch.testing.assert_close(tensors["latents"].float(), expected, rtol=1e-2, atol=1e-3)
    assert (tensors["latents"][:, 0] - tensors["latents"][:, 1]).abs().max() > 0.01  # the flip is not a copy


def test_report_names_the_corrupt_file(extracted, image_folder):
    report = json.loads((extracted / "report.json").read_text())
    assert report["num_failed"] == 1
    assert report["failed"][0]["path"] == str(image_folder / helpers.CORRUPT)
    assert "cannot identify image file" in report["failed"][0]["error"]


def test_one_or_two_processes_write_the_same_shards(extracted, extracted_in_process):
    meta2, two = load_shards(extracted)
    meta1, one = load_shards(extracted_in_process)
    assert meta1 == meta2
    assert torch.equal(one["labels"], two["labels"]) and torch.equal(one["indices"], two["indices"])
    torch.testing.assert_close(one["latents"], two["latents"], rtol=1e-2, atol=1e-3)


def test_resume_rewrites_only_the_missing_shard(extracted, tmp_path, tiny_vae, image_folder):
    out = tmp_path / "out"
    shutil.copytree(extracted, out)
    lost = out / "shard-00001.safetensors"  # rank 1's; rank 0 then has nothing left to do
    before = load_file(lost)
    lost.unlink()
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    proc = helpers.run_extract_cli([*helpers.extract_args(image_folder, out, tiny_vae), "--devices", "2"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "(4 already done)" in proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*") if p != lost} == mtimes
    after = load_file(lost)
    assert torch.equal(before["indices"], after["indices"]) and torch.equal(before["labels"], after["labels"])
    torch.testing.assert_close(before["latents"], after["latents"], rtol=1e-2, atol=1e-3)
    assert json.loads((out / "meta.json").read_text()) == json.loads((extracted / "meta.json").read_text())
    assert json.loads((out / "report.json").read_text()) == json.loads((extracted / "report.json").read_text())


def test_resume_refuses_shards_made_with_other_settings(extracted, tmp_path, tiny_vae, image_folder, capsys):
    out = tmp_path / "out"
    shutil.copytree(extracted, out)
    with pytest.raises(SystemExit) as info:
        main(helpers.extract_args(image_folder, out, tiny_vae, image_size=16))
    assert info.value.code == 2
    assert "image_size: 32 != 16" in capsys.readouterr().err


def _cli_error(args, capsys):
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    return capsys.readouterr().err


def test_cli_errors_are_clear(tmp_path, tiny_vae, image_folder, capsys):
    args = helpers.extract_args
    out = tmp_path / "out"
    assert "does not exist" in _cli_error(args(tmp_path / "nope", out, tiny_vae), capsys)
    (tmp_path / "empty" / "a_class").mkdir(parents=True)
    assert "no images found" in _cli_error(args(tmp_path / "empty", out, tiny_vae), capsys)
    assert "VAE directory" in _cli_error(args(image_folder, out, tmp_path / "no_vae"), capsys)
    (tmp_path / "a_file").write_text("")
    assert "not writable" in _cli_error(args(image_folder, tmp_path / "a_file" / "out", tiny_vae), capsys)
    assert "not divisible" in _cli_error(args(image_folder, out, tiny_vae, image_size=33), capsys)
    assert not os.path.exists(out / "meta.json")
