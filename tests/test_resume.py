"""Training runs that stop and go on: exact resume at any step (one process and DDP), SIGTERM/SIGINT,
one training per run directory, a symlinked last.ckpt, and runs that would train nothing."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from gspn_gen.checkpoints import read_checkpoint
from gspn_gen.data.sampler import EpochSampler
from gspn_gen.lit import GenerationModule
from gspn_gen.runlock import RunLock, dir_lock
from tests.test_reliability import digest, error_lines
from tests.test_train_sample import REPO, fit, write_config

# Epochs of 3 batches: a checkpoint at step 2, 4 or 5 falls in the middle of an epoch.
MID_EPOCH = ["--trainer.limit_train_batches", "3"]


def every_step_config(root: Path, max_steps: int) -> Path:
    """write_config, keeping a checkpoint of every step as step=N.ckpt beside last.ckpt."""
    path = write_config(root, max_steps=max_steps)
    cfg = yaml.safe_load(path.read_text())
    cfg["trainer"]["callbacks"][0]["init_args"].update(save_top_k=-1, filename="{step}")
    path.write_text(yaml.safe_dump(cfg))
    return path


def logged_losses(root: Path) -> dict[int, str]:
    with open(root / "metrics.csv", newline="") as f:
        return {int(r["step"]): r["train/loss"] for r in csv.DictReader(f) if r.get("train/loss")}


def assert_same_run(a: dict, b: dict) -> None:
    """Two checkpoints hold bit-identical training states: weights, EMA, optimiser, schedule, data order."""
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():  # model.* and ema.*
        assert torch.equal(value, b["state_dict"][key]), f"{key} differs"
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(sa[name], sb[name]), f"optimizer {name} differs"
    assert a["lr_schedulers"] == b["lr_schedulers"]
    loader = [c["loops"]["fit_loop"]["state_dict"]["combined_loader"] for c in (a, b)]
    assert loader[0] == loader[1]


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory) -> Path:
    """A 6-step run (3 batches per epoch) with a checkpoint of every step."""
    root = tmp_path_factory.mktemp("unbroken")
    fit(every_step_config(root, max_steps=6), *MID_EPOCH)
    return root


@pytest.mark.parametrize("step", [2, 4])
def test_resume_mid_epoch_is_bit_exact(unbroken, tmp_path, monkeypatch, step):
    """A resume from a checkpoint saved in the middle of an epoch continues the same batches and random
    streams: weights, EMA, optimiser state and logged losses equal the unbroken run's bit for bit. The
    checkpoint is read once: the resume check hands its copy to Lightning."""
    loads, real_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: loads.append(str(f)) or real_load(f, *a, **k))
    start = str(unbroken / f"step={step}.ckpt")
    fit(every_step_config(tmp_path, max_steps=6), *MID_EPOCH, "--ckpt_path", start)
    monkeypatch.undo()
    assert loads.count(start) == 1
    assert_same_run(read_checkpoint(str(unbroken / "last.ckpt")), read_checkpoint(str(tmp_path / "last.ckpt")))
    want = logged_losses(unbroken)
    assert logged_losses(tmp_path) == {s: v for s, v in want.items() if s >= step}


def test_ddp_resume_mid_epoch_is_bit_exact(tmp_path):
    """Two CPU processes (gloo): each rank's data share and random streams resume where they were."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    ddp = [*MID_EPOCH, "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for root, extra in ((a, []), (b, ["--ckpt_path", str(a / "step=2.ckpt")])):
        proc = subprocess.run([sys.executable, "train_gen.py", "fit", "--config", str(every_step_config(root, 4)),
                               *ddp, *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                              check=False)
        assert proc.returncode == 0, proc.stderr[-2000:]
    first, resumed = (read_checkpoint(str(d / "last.ckpt")) for d in (a, b))
    assert_same_run(first, resumed)
    assert first["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["consumed"] == 16  # 1 batch x 8 x 2 ranks
    assert logged_losses(b) == {s: v for s, v in logged_losses(a).items() if s >= 2}


def test_epoch_sampler_shares_resume_across_ranks_and_world_sizes():
    """The ranks take disjoint strided shares of one permutation; after `consumed` samples any world size
    continues with exactly the samples not yet seen."""
    full = [list(EpochSampler(20, seed=3, num_replicas=2, rank=r)) for r in (0, 1)]
    assert sorted(full[0] + full[1]) == sorted(set(full[0] + full[1])) and len(full[0]) == 10
    order = EpochSampler(20, seed=3).order(0)[0].tolist()
    assert full[0] == order[0::2] and full[1] == order[1::2]
    for world in (1, 2, 4):
        rest = []
        for r in range(world):
            s = EpochSampler(20, seed=3, num_replicas=world, rank=r)
            s.offset = 8  # 2 batches of 2 on 2 ranks were consumed
            rest += list(s)
        assert sorted(rest) == sorted(order[8:8 + len(rest)]) and len(rest) == (12 // world) * world
    s = EpochSampler(20, seed=3)
    s.set_epoch(1)
    assert list(s) != order  # a new epoch, a new order
    assert list(EpochSampler(20, seed=4)) != order  # another seed, another order


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_at_the_step_boundary_with_a_checkpoint(unbroken, tmp_path, monkeypatch, capsys, signum,
                                                               code):
    """SIGTERM/SIGINT during step 3: the step finishes, last.ckpt holds it, the exit status is 128 + signal,
    and the resumed run equals the unbroken one."""
    real_step = GenerationModule.training_step

    def signalled(self, batch, batch_idx):
        if self.global_step == 2:
            os.kill(os.getpid(), signum)  # arrives in the middle of the step
        return real_step(self, batch, batch_idx)

    monkeypatch.setattr(GenerationModule, "training_step", signalled)
    before = signal.getsignal(signum)  # the default, or SIG_IGN where pytest runs in a background job
    with pytest.raises(SystemExit) as exc:
        fit(every_step_config(tmp_path, max_steps=6), *MID_EPOCH)
    assert exc.value.code == code
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"stopped by {signal.Signals(signum).name} after global step 3" in err
    assert read_checkpoint(str(tmp_path / "last.ckpt"))["global_step"] == 3
    assert signal.getsignal(signum) == before  # handlers given back
    monkeypatch.setattr(GenerationModule, "training_step", real_step)
    fit(every_step_config(tmp_path, max_steps=6), *MID_EPOCH, "--ckpt_path", "last")
    assert_same_run(read_checkpoint(str(unbroken / "last.ckpt")), read_checkpoint(str(tmp_path / "last.ckpt")))
    assert logged_losses(tmp_path) == logged_losses(unbroken)


def test_a_second_training_into_a_run_directory_is_refused(tmp_path, capsys):
    """While one training holds the run directory, another stops with one line naming it, touching nothing."""
    config = write_config(tmp_path, max_steps=1)
    before = digest(tmp_path)
    with RunLock(dir_lock(tmp_path), "the run"), pytest.raises(SystemExit) as exc:  # as a running training
        fit(config)
    assert exc.value.code == 2
    errors = error_lines(capsys)
    assert len(errors) == 1 and f"pid {os.getpid()} on host {socket.gethostname()}" in errors[0]
    assert "two trainings cannot share a run directory" in errors[0]
    assert digest(tmp_path) == before


def test_a_stale_lock_of_a_dead_training_is_taken_over(tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    record = {"pid": int(dead.stdout), "host": socket.gethostname(), "started": "then", "command": "train_gen.py"}
    dir_lock(tmp_path).write_text(json.dumps(record))  # left by a training killed with -9
    fit(write_config(tmp_path, max_steps=1))
    assert "taken over from a training that ended without releasing it" in capsys.readouterr().err
    assert read_checkpoint(str(tmp_path / "last.ckpt"))["global_step"] == 1
    assert not dir_lock(tmp_path).exists()  # released at exit


def test_a_symlinked_last_ckpt_is_replaced_not_versioned(tmp_path):
    fit(write_config(tmp_path, max_steps=2))
    (tmp_path / "last.ckpt").rename(tmp_path / "kept.ckpt")
    (tmp_path / "last.ckpt").symlink_to("kept.ckpt")
    kept = (tmp_path / "kept.ckpt").read_bytes()
    fit(write_config(tmp_path, max_steps=3), "--ckpt_path", "last")
    assert not (tmp_path / "last.ckpt").is_symlink()
    assert read_checkpoint(str(tmp_path / "last.ckpt"))["global_step"] == 3
    assert (tmp_path / "kept.ckpt").read_bytes() == kept, "the link's target was written through"
    assert not list(tmp_path.glob("last-v*.ckpt"))


def test_a_fresh_run_into_a_used_directory_is_refused(tmp_path, capsys):
    fit(write_config(tmp_path, max_steps=1))
    before = digest(tmp_path)
    with pytest.raises(SystemExit) as exc:
        fit(write_config(tmp_path, max_steps=2))
    assert exc.value.code == 2
    errors = error_lines(capsys)
    assert len(errors) == 1 and "holds an earlier run" in errors[0] and "--ckpt_path last" in errors[0]
    before.pop("config.yaml")  # written by write_config above, not by the refused run
    assert {k: v for k, v in digest(tmp_path).items() if k != "config.yaml"} == before


@pytest.mark.parametrize("override", [["--trainer.max_steps", "0"], ["--trainer.max_epochs", "0",
                                                                        "--trainer.max_steps", "-1"]])
def test_a_run_that_would_train_nothing_is_refused(tmp_path, capsys, override):
    with pytest.raises(SystemExit) as exc:
        fit(write_config(tmp_path, max_steps=1), *override)
    assert exc.value.code == 2
    errors = error_lines(capsys)
    assert len(errors) == 1 and "nothing to train" in errors[0]
    assert not list(tmp_path.glob("*.ckpt"))


def test_a_signal_before_the_first_step_stops_at_once(tmp_path, monkeypatch, capsys):
    from gspn_gen.data.datamodule import DigitsDataModule

    real_setup = DigitsDataModule.setup

    def signalled(self, stage=None):
        os.kill(os.getpid(), signal.SIGTERM)  # while the data is being read
        return real_setup(self, stage)

    monkeypatch.setattr(DigitsDataModule, "setup", signalled)
    with pytest.raises(SystemExit) as exc:
        fit(write_config(tmp_path, max_steps=2))
    assert exc.value.code == 143
    err = capsys.readouterr().err
    assert "stopped by SIGTERM before the first training step" in err and "Traceback" not in err
    assert not list(tmp_path.glob("*.ckpt")) and not dir_lock(tmp_path).exists()


def test_a_deferred_checkpoint_appears_only_when_committed(tmp_path):
    """During fit a checkpoint is renamed into place at the next step, after its step's metrics row: a run
    killed in between resumes from the previous checkpoint and its log lacks no row."""
    from gspn_gen.checkpoints import SafeCheckpointIO

    io = SafeCheckpointIO(deferred=True)
    io.save_checkpoint({"step": 1}, tmp_path / "old.ckpt")
    io.commit()
    io.save_checkpoint({"step": 2}, tmp_path / "last.ckpt")
    io.remove_checkpoint(tmp_path / "old.ckpt")
    assert not (tmp_path / "last.ckpt").exists() and (tmp_path / "old.ckpt").exists()
    assert len(list(tmp_path.glob(".last.ckpt.*.tmp"))) == 1  # complete, beside its target
    io.commit()
    assert torch.load(tmp_path / "last.ckpt", weights_only=True) == {"step": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_a_resume_drops_exactly_the_rows_it_logs_again(tmp_path, capsys):
    """Training rows carry their batch index, evaluation rows the steps taken: resuming from step 2 drops
    training rows 2.. and evaluations after step 2, and keeps the evaluation of the checkpoint itself."""
    from gspn_gen.train_cli import _AppendingWriter

    (tmp_path / "metrics.csv").write_text("epoch,eval/fid,step,train/loss\n0,,0,1.0\n0,,1,0.9\n0,5.0,2,\n"
                                          "1,,2,0.8\n1,,3,0.7\n1,4.0,4,\n")
    _AppendingWriter(str(tmp_path), keep_below=2)
    assert (tmp_path / "metrics.csv").read_text() == "epoch,eval/fid,step,train/loss\n0,,0,1.0\n0,,1,0.9\n0,5.0,2,\n"
    assert "3 rows of steps >= 2 dropped" in capsys.readouterr().err
    _AppendingWriter(str(tmp_path), keep_below=0)  # a fresh start replaces the log of a run that left no checkpoint
    assert (tmp_path / "metrics.csv").read_text() == "epoch,eval/fid,step,train/loss\n"
