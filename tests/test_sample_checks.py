"""sample.py checks the whole request before its first sample: existing outputs (--overwrite), one writer
per output, writable places, step bounds, the codec and the network, and whether the result fits."""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from gspn_gen import fileio, sample_cli
from gspn_gen.checkpoints import read_checkpoint
from gspn_gen.runlock import RunLock, output_lock
from gspn_gen.sampling import run as sampling_run
from tests.test_reliability import error_lines
from tests.test_train_sample import fit, write_config


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("run")
    fit(write_config(root, max_steps=1))
    return root / "last.ckpt"


@pytest.fixture
def no_sampling(monkeypatch):
    """Fail the test if a sample is drawn: every refusal here must come before the work."""
    def refuse(*args, **kwargs):
        raise AssertionError("a sample was drawn before the request was refused")

    monkeypatch.setattr(sampling_run, "generate", refuse)


def refused(capsys, *args: str) -> str:
    """Run sample.py, expect exit 2 with exactly one error line, return it."""
    with pytest.raises(SystemExit) as exc:
        sample_cli.main(list(args))
    assert exc.value.code == 2
    errors = error_lines(capsys)
    assert len(errors) == 1, errors
    return errors[0]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_existing_output_is_kept_unless_overwrite(ckpt, tmp_path, capsys):
    npz, png = tmp_path / "s.npz", tmp_path / "g.png"
    sample_cli.main(["--ckpt", str(ckpt), "--num-samples", "4", "--steps", "1", "--out", str(npz)])
    sample_cli.main(["--ckpt", str(ckpt), "--classes", "1", "--per-class", "1", "--steps", "1", "--out", str(png)])
    before = {p: sha(p) for p in (npz, png)}
    line = refused(capsys, "--ckpt", str(ckpt), "--num-samples", "2", "--steps", "1", "--out", str(npz))
    assert str(npz) in line and "--overwrite" in line
    line = refused(capsys, "--ckpt", str(ckpt), "--classes", "2", "--steps", "1", "--out", str(png))
    assert str(png) in line and "--overwrite" in line
    assert {p: sha(p) for p in (npz, png)} == before
    sample_cli.main(["--ckpt", str(ckpt), "--num-samples", "2", "--steps", "1", "--out", str(npz), "--overwrite"])
    assert np.load(npz)["arr_0"].shape[0] == 2


def test_a_run_killed_after_writing_the_npz_continues_without_overwrite(ckpt, tmp_path, monkeypatch):
    """OUT.npz beside its own shards (killed while removing them) is the same run, not another output."""
    out = tmp_path / "s.npz"
    args = ["--ckpt", str(ckpt), "--num-samples", "4", "--shard-size", "2", "--steps", "1", "--out", str(out)]
    real_unlink = Path.unlink

    def killed_in_cleanup(self, *a, **k):
        if self.parent.name == "s.npz.parts" and self.name == "shard-00001.npz":
            raise KeyboardInterrupt("killed")
        return real_unlink(self, *a, **k)

    monkeypatch.setattr(Path, "unlink", killed_in_cleanup)
    with pytest.raises(KeyboardInterrupt):
        sample_cli.main(args)
    monkeypatch.setattr(Path, "unlink", real_unlink)
    first = np.load(out)["arr_0"]
    sample_cli.main(args)
    np.testing.assert_array_equal(np.load(out)["arr_0"], first)
    assert not (tmp_path / "s.npz.parts").exists()


def test_a_second_sampling_run_on_one_output_is_refused(ckpt, tmp_path, capsys, no_sampling):
    out = tmp_path / "s.npz"
    with RunLock(output_lock(out), "the output"):  # as a running sample.py holds it
        line = refused(capsys, "--ckpt", str(ckpt), "--num-samples", "2", "--steps", "1", "--out", str(out))
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "the refused run left files behind"


def test_an_unwritable_output_is_refused_before_sampling(ckpt, tmp_path, capsys, no_sampling):
    (tmp_path / "file").write_text("")
    for out in (tmp_path / "file" / "s.npz", tmp_path / "file" / "g.png", Path("/proc/gspn-gen/s.npz")):
        args = ["--num-samples", "2"] if out.suffix == ".npz" else []
        line = refused(capsys, "--ckpt", str(ckpt), *args, "--steps", "1", "--out", str(out))
        assert "cannot write into" in line and str(out.parent) in line
    if os.geteuid() != 0:  # root writes into read-only directories
        (tmp_path / "ro").mkdir(mode=0o555)
        assert "cannot write into" in refused(capsys, "--ckpt", str(ckpt), "--out", str(tmp_path / "ro" / "g.png"))


@pytest.mark.parametrize("args, expected", [
    (["--steps", "100000"], "--steps 100000: this checkpoint's gaussian process has 1000 timesteps"),
    (["--num-samples", "1000000000"], "--num-samples 1000000000 at 8x8"),
    (["--classes", "1", "--per-class", "100000000"], "a grid of 1 x 100000000 images"),
])
def test_requests_out_of_bounds_are_refused_before_sampling(ckpt, tmp_path, capsys, no_sampling, args, expected):
    out = str(tmp_path / ("s.npz" if "--num-samples" in args else "g.png"))
    line = refused(capsys, "--ckpt", str(ckpt), "--out", out, *args)
    assert expected in line
    if "--num-samples" in args:  # the numbers: what it needs, what there is, what fits
        assert "needs about" in line and "at most about" in line and "samples fit" in line
    assert list(tmp_path.iterdir()) == [], "something was written"


def test_disk_space_bounds_the_sample_count(ckpt, tmp_path, capsys, monkeypatch, no_sampling):
    monkeypatch.setattr(sampling_run, "free_bytes", lambda d: 10 * 1000)  # 10 kB: ~25 samples of 8x8x3 x 2
    line = refused(capsys, "--ckpt", str(ckpt), "--num-samples", "100", "--out", str(tmp_path / "s.npz"))
    assert "10.0 kB free" in line and "at most about 25 samples fit" in line


@pytest.mark.parametrize("change, expected", [
    ({"codec": {"name": "sd-vae", "path": "/missing/vae", "scale": 0.18215}}, "VAE directory '/missing/vae'"),
    ({"codec": {"name": "jpeg"}}, "unknown codec 'jpeg'"),
    ({"model_args": {"hidden_size": 32, "depth": 2, "num_heads": 2, "gspn_backend": "bogus"}}, "'bogus'"),
])
def test_a_codec_or_backend_that_cannot_run_is_refused_before_sampling(ckpt, tmp_path, capsys, no_sampling,
                                                                       change, expected):
    bad = read_checkpoint(str(ckpt))
    bad["hyper_parameters"].update(change)
    torch.save(bad, tmp_path / "bad.ckpt")
    for out in ("g.png", "s.npz"):
        extra = ["--num-samples", "2"] if out.endswith(".npz") else []
        line = refused(capsys, "--ckpt", str(tmp_path / "bad.ckpt"), *extra, "--out", str(tmp_path / out))
        assert expected in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.ckpt"]


def test_vae_given_on_the_command_line_is_checked_first(ckpt, tmp_path, capsys, no_sampling):
    (tmp_path / "empty").mkdir()
    for vae, expected in (("/missing/dir", "does not exist"), (str(tmp_path / "empty"), "no readable config.json")):
        line = refused(capsys, "--ckpt", str(ckpt), "--vae", vae, "--out", str(tmp_path / "g.png"))
        assert line.startswith("error: --vae:") and expected in line


def test_output_checks_name_the_path_and_the_flag(tmp_path):
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(fileio.OutputError, match=r"--out .*x\.json' exists; pass --overwrite"):
        fileio.check_output(tmp_path / "x.json", overwrite=False)
    fileio.check_output(tmp_path / "x.json", overwrite=True)
    fileio.check_output(tmp_path / "new" / "y.json", overwrite=False)  # creates the folder, leaves no probe
    assert list((tmp_path / "new").iterdir()) == []
    assert fileio.format_bytes(196_608_000_000_000) == "196.6 TB" and fileio.format_bytes(512) == "512 B"
