"""Fault drill: kill -9, a full disk, replaced checkpoints, NaN files and malicious pickles, on the digits recipe.

    python benchmarks/fault_drill.py                     # every drill: ~13 CPU-minutes, 32 min on a busy 2-core box
    python benchmarks/fault_drill.py --quick             # one run of each drill
    python benchmarks/fault_drill.py --only kill_in_write,pickles --work /tmp/drill

Prints a table drill -> runs -> failures (with what failed) and writes
benchmarks/results/fault-drill-<machine>-<date>.json. A run fails when its invariant does not hold:

  kill_random, kill_in_write   kill -9 at a random moment of training / half-way through a checkpoint write
                               (half of the runs with TMPDIR on another filesystem, /dev/shm): the newest
                               checkpoint loads, `--ckpt_path last` resumes to exactly the weights of an
                               unbroken run, metrics.csv keeps a row for every step, no temp file is left
  full_disk                    a checkpoint write fails with ENOSPC half-way: exit 1, one error line naming
                               the path, the previous checkpoint intact, no temp file
  blown_up_weights             weights turn NaN / huge at a step: exit 1, one error line, the checkpoint left
                               holds finite weights from an earlier step
  kill_sampling, kill_assembly kill -9 while drawing shards / while writing the .npz or removing the shards:
                               the same command again gives a bit-identical .npz
  replaced_checkpoint          the checkpoint file is replaced between two sampling runs: refused, exit 2
  bad_shards                   a short, truncated or foreign shard, a manifest with no shard: redrawn,
                               bit-identical .npz
  nan_checkpoint               a checkpoint with NaN weights: resuming it is refused, sampling it warns
  fid_nonfinite                NaN/inf statistics and features into fid_eval: one error line, exit 2, no
                               non-JSON report
  bad_inputs                   each bad input: one `error:` line, exit 2, no traceback; the run directory
                               is untouched
  pickles                      a malicious pickle into every file input (checkpoints, --ckpt_path FILE and
                               last, sample shards, fid_eval npz object arrays, statistics .pt/.npz,
                               extractor weights): never executed, refused with one error line

Every process is a real `train_gen.py` / `sample.py` / `python -m fid_eval` run; faults inside a process
(a kill half-way through a write, ENOSPC, blown-up weights) are injected by a small driver that wraps
`torch.save`, `np.savez`, `Path.unlink` or the optimizer step before calling the real entry point.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
TEMP_PATTERN = re.compile(r"\.tmp")  # ours (.name.PID.HEX.tmp), Lightning's and the old writers' all say .tmp
ERROR_LINE = re.compile(r"^(\S+: )?error: ")

# Runs inside the child process: inject the fault named by $DRILL_FAULT, then run the real entry point.
DRIVER = r'''
import errno, io, os, signal, sys
kind, *arg = os.environ.get("DRILL_FAULT", "none").split(":")
calls = [0]

def die_or_fail(f, data, frac):
    f.write(data[: int(len(data) * frac)]); f.flush(); os.fsync(f.fileno())
    if kind.startswith("kill"):
        os.kill(os.getpid(), signal.SIGKILL)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

if kind in ("kill_save", "enospc_save"):
    import torch
    real_save = torch.save
    def save(obj, f, *a, **k):
        if isinstance(f, io.BufferedWriter):
            calls[0] += 1
            if calls[0] == int(arg[0]):
                buf = io.BytesIO(); real_save(obj, buf, *a, **k)
                die_or_fail(f, buf.getvalue(), float(arg[1]))
        return real_save(obj, f, *a, **k)
    torch.save = save
elif kind == "blowup":
    import torch
    from gspn_gen.lit import GenerationModule
    real_step = GenerationModule.optimizer_step
    def step(self, *a, **k):
        real_step(self, *a, **k)
        if self.global_step >= int(arg[0]):
            with torch.no_grad():
                for p in self.model.parameters():
                    p.fill_(float("nan")) if arg[1] == "nan" else p.mul_(1e12)
    GenerationModule.optimizer_step = step
elif kind == "kill_final_npz":
    import numpy as np
    real_savez = np.savez
    def savez(f, **arrays):
        if len(arrays["arr_0"]) == int(arg[0]) and isinstance(f, io.BufferedWriter):
            buf = io.BytesIO(); real_savez(buf, **arrays)
            die_or_fail(f, buf.getvalue(), float(arg[1]))
        return real_savez(f, **arrays)
    np.savez = savez
elif kind == "kill_cleanup":
    import pathlib
    real_unlink = pathlib.Path.unlink
    def unlink(self, *a, **k):
        if self.parent.name.endswith(".parts"):
            calls[0] += 1
            if calls[0] == int(arg[0]):
                os.kill(os.getpid(), signal.SIGKILL)
        return real_unlink(self, *a, **k)
    pathlib.Path.unlink = unlink

entry = sys.argv[1]
sys.argv = [entry] + sys.argv[2:]
if entry == "train":
    from gspn_gen.train_cli import main
else:
    from gspn_gen.sample_cli import main
main()
'''


class Evil:
    """Unpickling this runs `touch MARKER`: any file input that executes it has unpickled user data."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_malicious_files(directory: Path, marker: Path) -> dict[str, Path]:
    """One malicious file per kind of file input; unpickling any of them creates `marker`."""
    directory.mkdir(parents=True, exist_ok=True)
    evil = Evil(marker)
    files = {
        "checkpoint": directory / "evil.ckpt",
        "npz_object_array": directory / "evil_samples.npz",
        "stats_pt": directory / "evil_stats.pt",
        "stats_npz": directory / "evil_stats.npz",
        "extractor_weights": directory / "evil_weights.pt",
        "shard": directory / "evil_shard.npz",
    }
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hyper_parameters": {"model": evil}}, files["checkpoint"])
    np.savez(files["npz_object_array"], arr_0=np.array([evil, evil], dtype=object))
    torch.save({"mu": torch.zeros(4), "sigma": torch.eye(4), "meta": evil}, files["stats_pt"])
    np.savez(files["stats_npz"], mu=np.array([evil], dtype=object), sigma=np.eye(4))
    torch.save({"conv.weight": evil}, files["extractor_weights"])
    np.savez(files["shard"], arr_0=np.array([evil], dtype=object), arr_1=np.array([evil], dtype=object),
             settings=np.array([evil], dtype=object))
    return files


def tiny_config(root: Path, steps: int, seed: int = 0) -> Path:
    """The digits recipe at drill size: 2-layer GSPN-T/2 at 8x8, two batches per epoch, a checkpoint per epoch.

    Checkpoints fall on epoch ends because only there is a resume exact: Lightning does not replay the
    shuffled order of a half-finished epoch. (`limit_train_batches: 1` would be read as 1.0, i.e. 100%.)
    """
    cfg = {
        "seed_everything": seed,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": steps, "default_root_dir": str(root),
            "limit_train_batches": 2, "limit_val_batches": 0, "log_every_n_steps": 1,
            "enable_progress_bar": False, "enable_model_summary": False, "gradient_clip_val": 1.0,
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"save_top_k": 0, "save_last": True, "every_n_train_steps": 2}}],
        },
        "model": {"model": "GSPN-T/2", "model_args": {"hidden_size": 32, "depth": 2, "num_heads": 2},
                  "lr": 1e-3, "warmup_steps": 2, "lr_schedule": "cosine", "ema_decay": 0.9},
        "data": {"class_path": "gspn_gen.data.datamodule.DigitsDataModule",
                 "init_args": {"image_size": 8, "batch_size": 8}},
    }
    root.mkdir(parents=True, exist_ok=True)
    path = root.parent / f"{root.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class Drill:
    """Shared state of one drill session: work directory, child environment, reference results."""

    def __init__(self, work: Path, steps: int = 12, samples: int = 48, seed: int = 0, other_fs_first: bool = False):
        self.work = work
        self.other_fs_first = other_fs_first  # run 0 (and every other) with TMPDIR on another filesystem
        self.steps, self.samples = steps, samples
        self.rng = random.Random(seed)
        self.other_fs = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
        # One thread per child: on a busy 2-core machine two OpenMP threads mostly wait on each other.
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
                    "GSPN_FID_CACHE": str(work / "fid-cache")}  # never the user's statistics cache
        self._reference: dict | None = None
        self._samples: dict | None = None

    # ------------------------------------------------------------ processes
    def command(self, entry: str, args: list[str], fault: str = "none") -> list[str]:
        if entry == "fid":
            return [sys.executable, "-m", "fid_eval", *args]
        return [sys.executable, "-c", DRIVER, entry, *args] if fault != "none" else \
            [sys.executable, {"train": "train_gen.py", "sample": "sample.py"}[entry], *args]

    def run(self, entry: str, args: list[str], fault: str = "none", tmpdir: Path | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
        env = {**self.env, "DRILL_FAULT": fault, **({"TMPDIR": str(tmpdir)} if tmpdir else {})}
        return subprocess.run(self.command(entry, args, fault), cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def spawn(self, entry: str, args: list[str], tmpdir: Path | None = None) -> subprocess.Popen:
        env = {**self.env, **({"TMPDIR": str(tmpdir)} if tmpdir else {})}
        return subprocess.Popen(self.command(entry, args), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)

    def tmpdir(self, name: str, other_fs: bool) -> Path:
        base = self.other_fs if other_fs and self.other_fs else self.work
        path = Path(tempfile.mkdtemp(prefix=f"drill-{name}-", dir=base))
        return path

    # ------------------------------------------------------------ references
    def reference(self) -> dict:
        """An unbroken training run: its final weights and how long its steps take."""
        if self._reference is None:
            root = self.work / "reference"
            start = time.perf_counter()
            p = self.spawn("train", ["fit", "--config", str(tiny_config(root, self.steps))])
            first = wait_for(lambda: (root / "checkpoints" / "last.ckpt").exists() or p.poll() is not None, 600)
            first_at = time.perf_counter()
            p.wait(600)
            err = p.stderr.read()
            if p.returncode != 0:
                raise RuntimeError(f"reference training failed: {err[-2000:]}")
            ckpt = load(root / "checkpoints" / "last.ckpt")
            self._reference = {"root": root, "state": ckpt["state_dict"], "step": ckpt["global_step"],
                               "train_s": max(time.perf_counter() - first_at, 0.5) if first else 1.0,
                               "startup_s": first_at - start}
        return self._reference

    def samples_reference(self) -> dict:
        """A checkpoint A, a different checkpoint B, and the .npz an unbroken sampling run draws from A."""
        if self._samples is None:
            ref = self.reference()
            d = self.work / "sampling"
            d.mkdir(exist_ok=True)
            a, b = d / "A.ckpt", d / "B.ckpt"
            shutil.copy(ref["root"] / "checkpoints" / "last.ckpt", a)
            ckpt = load(a)
            for k, v in ckpt["state_dict"].items():
                if k.startswith("ema.") and v.is_floating_point():
                    v.add_(0.01)
            torch.save(ckpt, b)
            out = d / "reference.npz"
            proc = self.run("sample", self.sample_args(a, out))
            if proc.returncode != 0:
                raise RuntimeError(f"reference sampling failed: {proc.stderr[-2000:]}")
            self._samples = {"A": a, "B": b, "npz": out, "arrays": npz_arrays(out)}
        return self._samples

    def sample_args(self, ckpt: Path, out: Path) -> list[str]:
        return ["--ckpt", str(ckpt), "--num-samples", str(self.samples), "--shard-size", "4", "--batch-size", "2",
                "--steps", "10", "--sampler", "ddpm", "--out", str(out)]

    # ------------------------------------------------------------ invariants
    def check_resume(self, root: Path, tmpdir: Path | None, tmp_before: set) -> list[str]:
        """After a kill: the newest checkpoint loads, the resume is exact, no row and no temp file is lost."""
        problems = []
        last = root / "checkpoints" / "last.ckpt"
        if last.exists():
            try:
                load(last)
            except Exception as e:  # noqa: BLE001 - any failure is what the drill counts
                problems.append(f"last.ckpt unloadable after the kill: {type(e).__name__}")
        proc = self.run("train", ["fit", "--config", str(root.parent / f"{root.name}.yaml"), "--ckpt_path", "last"],
                        tmpdir=tmpdir)
        if proc.returncode != 0:
            return problems + [f"resume exit {proc.returncode}: {last_lines(proc.stderr)}"]
        ckpt = load(last)
        ref = self.reference()
        if ckpt["global_step"] != ref["step"]:
            problems.append(f"resumed to step {ckpt['global_step']}, not {ref['step']}")
        state = ckpt["state_dict"]
        differ = [k for k, v in ref["state"].items() if k not in state or not torch.equal(v, state[k])]
        if differ:
            problems.append(f"resume not exact: {len(differ)} tensors differ (e.g. {differ[0]})")
        steps = csv_steps(root / "metrics.csv")
        lost = sorted(set(range(ref["step"])) - steps)
        if lost:
            problems.append(f"metrics.csv lost the rows of steps {lost[:8]}")
        temps = [p.name for p in root.rglob("*") if TEMP_PATTERN.search(p.name)]
        if temps:
            problems.append(f"temp files left in the run: {temps[:3]}")
        if tmpdir is not None:  # torch's compiler cache may appear there; checkpoints may not
            new = {n for n in set(os.listdir(tmpdir)) - tmp_before if not n.startswith("torchinductor_")}
            if new:
                problems.append(f"files left in TMPDIR: {sorted(new)[:3]}")
        return problems

    def resample_and_check(self, ckpt: Path, out: Path) -> list[str]:
        """Rerun the interrupted sampling command; its .npz must equal the unbroken run's."""
        proc = self.run("sample", self.sample_args(ckpt, out))
        return [f"rerun exit {proc.returncode}: {last_lines(proc.stderr)}"] if proc.returncode else self.check_samples(out)

    def check_samples(self, out: Path) -> list[str]:
        ref = self.samples_reference()["arrays"]
        problems = []
        try:
            got = npz_arrays(out)
        except Exception as e:  # noqa: BLE001
            return [f"{out.name} unreadable: {type(e).__name__}"]
        for k in ref:
            if k not in got or not np.array_equal(got[k], ref[k]):
                problems.append(f"{out.name}: {k} differs from the unbroken run")
        leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith((f".{out.name}", f"{out.name}."))]
        if leftovers:
            problems.append(f"left behind: {leftovers[:3]}")
        return problems


# ---------------------------------------------------------------- helpers
def wait_for(condition, timeout: float, poll: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(poll)
    return False


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def npz_arrays(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def csv_steps(path: Path) -> set[int]:
    if not path.exists():
        return set()
    import csv

    with open(path, newline="") as f:
        return {int(row["step"]) for row in csv.DictReader(f) if row.get("step", "").isdigit()}


def last_lines(text: str, n: int = 2) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-n:])[-300:]


def one_error_line(proc: subprocess.CompletedProcess, code: int = 2, contains: str = "") -> str | None:
    """None when the process failed as it should: exit `code`, exactly one error line, no traceback."""
    errors = [line for line in proc.stderr.splitlines() if ERROR_LINE.match(line)]
    if "Traceback" in proc.stderr:
        return f"traceback: {last_lines(proc.stderr, 1)}"
    if proc.returncode != code:
        return f"exit {proc.returncode}, expected {code}: {last_lines(proc.stderr)}"
    if len(errors) != 1:
        return f"{len(errors)} error lines: {last_lines(proc.stderr)}"
    if contains and contains.lower() not in errors[0].lower():
        return f"error line does not mention {contains!r}: {errors[0][:200]}"
    return None


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def strict_json_problem(path: Path) -> str | None:
    if not path.exists():
        return None

    def refuse(name):
        raise ValueError(name)

    try:
        report = json.loads(path.read_text(), parse_constant=refuse)
    except ValueError as e:
        return f"{path.name} is not strict JSON ({e})"
    numbers = json.dumps(report)
    return None if "NaN" not in numbers else f"{path.name} holds NaN"


# ---------------------------------------------------------------- drills: training
def drill_kill_random(d: Drill, runs: int) -> tuple[int, list[str]]:
    """kill -9 at a random moment of training, then resume with --ckpt_path last."""
    failures, landed = [], 0
    ref = d.reference()
    for i in range(runs):
        root = d.work / f"kill_random-{i}"
        tmp = d.tmpdir(f"kr{i}", other_fs=(i % 2 == 1) != d.other_fs_first)
        before = set(os.listdir(tmp))
        p = d.spawn("train", ["fit", "--config", str(tiny_config(root, d.steps))], tmpdir=tmp)
        wait_for(lambda root=root, p=p: (root / "checkpoints" / "last.ckpt").exists() or p.poll() is not None, 600)
        time.sleep(d.rng.uniform(0, ref["train_s"] * 0.9))
        if p.poll() is None:  # a run that finished first is not a kill and is not counted
            landed += 1
            p.send_signal(signal.SIGKILL)
            p.wait()
            problems = d.check_resume(root, tmp, before)
            failures += [f"run {i} (TMPDIR {tmp.parent}): {msg}" for msg in problems]
        else:
            p.wait()
    return landed, failures


def drill_kill_in_write(d: Drill, runs: int) -> tuple[int, list[str]]:
    """kill -9 half-way through writing checkpoint k (the temp file holds a random fraction of it)."""
    failures = []
    d.reference()
    for i in range(runs):
        root = d.work / f"kill_in_write-{i}"
        tmp = d.tmpdir(f"kw{i}", other_fs=(i % 2 == 1) != d.other_fs_first)
        before = set(os.listdir(tmp))
        k, frac = d.rng.randint(2, d.steps // 2 - 1), d.rng.uniform(0.05, 0.95)
        proc = d.run("train", ["fit", "--config", str(tiny_config(root, d.steps))], f"kill_save:{k}:{frac:.3f}",
                     tmpdir=tmp)
        problems = []
        if proc.returncode != -signal.SIGKILL:
            problems.append(f"expected the injected kill, got exit {proc.returncode}: {last_lines(proc.stderr)}")
        elif not any(TEMP_PATTERN.search(p.name) for p in (root / "checkpoints").iterdir()):
            problems.append("no half-written temp file found: the kill did not land in a write")
        problems += d.check_resume(root, tmp, before)
        failures += [f"run {i} (save {k}, {frac:.0%}, TMPDIR {tmp.parent}): {p}" for p in problems]
    return runs, failures


def drill_full_disk(d: Drill, runs: int) -> tuple[int, list[str]]:
    failures = []
    for i in range(runs):
        root = d.work / f"full_disk-{i}"
        k = d.rng.randint(2, d.steps // 2 - 1)
        proc = d.run("train", ["fit", "--config", str(tiny_config(root, d.steps))], f"enospc_save:{k}:0.5")
        problems = [p for p in [one_error_line(proc, 1, "No space left")] if p]
        if not problems and "last.ckpt" not in proc.stderr:
            problems.append("the error line does not name the checkpoint path")
        try:
            step = load(root / "checkpoints" / "last.ckpt")["global_step"]
            if step != 2 * (k - 1):  # save k is the checkpoint of step 2k
                problems.append(f"last.ckpt is from step {step}, expected {2 * (k - 1)}")
        except Exception as e:  # noqa: BLE001
            problems.append(f"previous last.ckpt unloadable: {type(e).__name__}")
        temps = [p.name for p in root.rglob("*") if TEMP_PATTERN.search(p.name)]
        if temps:
            problems.append(f"temp files left: {temps[:3]}")
        failures += [f"run {i} (save {k}): {p}" for p in problems]
    return runs, failures


def drill_blown_up_weights(d: Drill, runs: int) -> tuple[int, list[str]]:
    failures = []
    for i in range(runs):
        root = d.work / f"blown_up-{i}"
        k, how = d.rng.randint(1, d.steps // 2 - 1) * 2 - i % 2, ("nan", "huge")[i % 2]
        proc = d.run("train", ["fit", "--config", str(tiny_config(root, d.steps))], f"blowup:{k}:{how}")
        # stopped by the weight check before the checkpoint, or by the NaN loss of the next step
        problems = [p for p in [one_error_line(proc, 1, "weights"), one_error_line(proc, 1, "loss is")] if p]
        problems = problems if len(problems) == 2 else []
        try:
            ckpt = load(root / "checkpoints" / "last.ckpt")
            biggest = max(float(v.abs().max()) for v in ckpt["state_dict"].values() if v.is_floating_point())
            if not np.isfinite(biggest) or biggest > 1e10 or ckpt["global_step"] > k:
                problems.append(f"last.ckpt (step {ckpt['global_step']}) holds weights up to {biggest:g}")
        except Exception as e:  # noqa: BLE001
            problems.append(f"last.ckpt unloadable: {type(e).__name__}")
        failures += [f"run {i} ({how} at step {k}): {p}" for p in problems]
    return runs, failures


# ---------------------------------------------------------------- drills: sampling
def _partial_sampling(d: Drill, ckpt: Path, out: Path, shards: int) -> bool:
    """Start sampling and kill -9 it once `shards` shards exist; False when it finished first (no kill)."""
    parts = Path(f"{out}.parts")
    p = d.spawn("sample", d.sample_args(ckpt, out))
    wait_for(lambda: len(list(parts.glob("shard-*.npz"))) >= shards or p.poll() is not None, 600)
    time.sleep(d.rng.uniform(0, 0.1))
    killed = p.poll() is None
    p.send_signal(signal.SIGKILL)
    p.wait()
    return killed


def drill_kill_sampling(d: Drill, runs: int) -> tuple[int, list[str]]:
    failures, landed = [], 0
    s = d.samples_reference()
    for i in range(runs):
        out = d.work / f"kill_sampling-{i}" / "samples.npz"
        out.parent.mkdir(parents=True, exist_ok=True)
        if not _partial_sampling(d, s["A"], out, d.rng.randint(0, d.samples // 4 - 2)):
            continue
        landed += 1
        problems = d.resample_and_check(s["A"], out)
        failures += [f"run {i}: {p}" for p in problems]
    return landed, failures


def drill_kill_assembly(d: Drill, runs: int) -> tuple[int, list[str]]:
    failures = []
    s = d.samples_reference()
    for i in range(runs):
        out = d.work / f"kill_assembly-{i}" / "samples.npz"
        out.parent.mkdir(parents=True, exist_ok=True)
        fault = (f"kill_final_npz:{d.samples}:{d.rng.uniform(0.05, 0.95):.3f}" if i % 2 == 0
                 else f"kill_cleanup:{d.rng.randint(1, d.samples // 4)}")
        proc = d.run("sample", d.sample_args(s["A"], out), fault)
        problems = []
        if proc.returncode != -signal.SIGKILL:
            problems.append(f"expected the injected kill, got exit {proc.returncode}")
        problems += d.resample_and_check(s["A"], out)
        failures += [f"run {i} ({fault.split(':')[0]}): {p}" for p in problems]
    return runs, failures


def drill_replaced_checkpoint(d: Drill, runs: int) -> tuple[int, list[str]]:
    failures = []
    s = d.samples_reference()
    for i in range(runs):
        work = d.work / f"replaced-{i}"
        work.mkdir(parents=True, exist_ok=True)
        ckpt, out = work / "model.ckpt", work / "samples.npz"
        shutil.copy(s["A"], ckpt)
        if not _partial_sampling(d, ckpt, out, d.rng.randint(1, d.samples // 4 - 2)):
            failures.append(f"run {i}: sampling finished before the kill; nothing tested")
            continue
        shutil.copy(s["B"], ckpt)  # another model at the same path
        proc = d.run("sample", d.sample_args(ckpt, out))
        problems = [p for p in [one_error_line(proc, 2, "another checkpoint")] if p]
        if out.exists():
            problems.append("an .npz was written from mixed models")
        shutil.copy(s["A"], ckpt)
        proc = d.run("sample", d.sample_args(ckpt, out))
        problems += [f"rerun with the original exit {proc.returncode}"] if proc.returncode else d.check_samples(out)
        failures += [f"run {i}: {p}" for p in problems]
    return runs, failures


def drill_bad_shards(d: Drill, runs: int) -> tuple[int, list[str]]:
    failures = []
    s = d.samples_reference()
    kinds = ("short", "truncated", "foreign", "manifest_only")
    for i in range(runs):
        kind = kinds[i % len(kinds)]
        out = d.work / f"bad_shards-{i}" / "samples.npz"
        out.parent.mkdir(parents=True, exist_ok=True)
        parts = Path(f"{out}.parts")
        if kind == "manifest_only":
            parts.mkdir()
            (parts / "settings.json").write_text(json.dumps({"seed": 7, "sampler": "nope"}))
        else:  # every shard drawn, the run killed as it cleans up; then the output goes and a shard is spoilt
            d.run("sample", d.sample_args(s["A"], out), "kill_cleanup:1")
            out.unlink()
            shard = parts / "shard-00000.npz"
            with np.load(shard, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            if kind == "short":
                np.savez(shard, arr_0=arrays["arr_0"][:2], arr_1=arrays["arr_1"][:2], settings=arrays["settings"])
            elif kind == "truncated":
                shard.write_bytes(shard.read_bytes()[:300])
            else:
                np.savez(shard, **{**arrays, "settings": np.array('{"seed": 99}')})
        problems = d.resample_and_check(s["A"], out)
        failures += [f"run {i} ({kind}): {p}" for p in problems]
    return runs, failures


def drill_nan_checkpoint(d: Drill, runs: int) -> tuple[int, list[str]]:
    failures = []
    s = d.samples_reference()
    nan = d.work / "nan.ckpt"
    ckpt = load(s["A"])
    for v in ckpt["state_dict"].values():
        if v.is_floating_point():
            v.fill_(float("nan"))
    torch.save(ckpt, nan)
    for i in range(runs):
        root = d.work / f"nan_resume-{i}"
        proc = d.run("train", ["fit", "--config", str(tiny_config(root, d.steps)), "--ckpt_path", str(nan)])
        problem = one_error_line(proc, 2, "NaN")
        if problem:
            failures.append(f"run {i} (resume): {problem}")
        proc = d.run("sample", ["--ckpt", str(nan), "--classes", "1", "--per-class", "2", "--steps", "2",
                                "--out", str(d.work / f"nan-{i}.png")])
        warned = [line for line in proc.stderr.splitlines() if line.startswith("warning:") and "NaN" in line]
        if proc.returncode != 0 or not warned:
            failures.append(f"run {i} (sample): exit {proc.returncode}, {len(warned)} NaN warnings")
    return 2 * runs, failures


# ---------------------------------------------------------------- drills: fid_eval
def _fid_reference_stats(d: Drill) -> Path:
    path = d.work / "fid" / "ref.npz"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        proc = d.run("fid", ["stats", "--input", "digits:val", "--out", str(path), "--extractor", "digits",
                             "--device", "cpu", "--no-progress"])
        if proc.returncode:
            raise RuntimeError(f"fid_eval stats failed: {proc.stderr[-1000:]}")
    return path


def drill_fid_nonfinite(d: Drill, runs: int) -> tuple[int, list[str]]:
    """NaN/inf in reference mu/sigma and in sample features: refused, never a NaN score or non-JSON report."""
    failures = []
    ref = _fid_reference_stats(d)
    with np.load(ref, allow_pickle=False) as z:
        base = {k: z[k] for k in z.files}
    cases = {
        "nan_mu": ("ref", "fid", {"mu": lambda a: _poison(a, np.nan)}),
        "inf_mu": ("ref", "fid", {"mu": lambda a: _poison(a, np.inf)}),
        "nan_sigma": ("ref", "fid", {"sigma": lambda a: _poison(a, np.nan)}),
        "nan_features": ("samples", "kid,prc", {"features": lambda a: _poison(a, np.nan)}),
        "inf_features": ("samples", "kid,prc", {"features": lambda a: _poison(a, np.inf)}),
    }
    names = list(cases)
    for i in range(runs * len(names)):
        name = names[i % len(names)]
        role, metrics, edits = cases[name]
        bad = d.work / "fid" / f"{name}.npz"
        np.savez(bad, **{k: edits[k](v) if k in edits else v for k, v in base.items()})
        out = d.work / "fid" / f"{name}-{i}.json"
        samples, reference = (str(bad), str(ref)) if role == "samples" else (str(ref), str(bad))
        proc = d.run("fid", ["--samples", samples, "--ref", reference, "--extractor", "digits", "--device", "cpu",
                             "--metrics", metrics, "--no-progress", "--no-cache", "--out", str(out)])
        problems = [p for p in (one_error_line(proc, 2), strict_json_problem(out)) if p]
        failures += [f"{name}: {p}" for p in problems]
    return runs * len(names), failures


def _poison(a: np.ndarray, value: float) -> np.ndarray:
    a = np.array(a, dtype=np.float64 if a.dtype == np.float64 else np.float32)
    a.flat[0] = value
    return a


# ---------------------------------------------------------------- drills: inputs
def bad_input_cases(d: Drill) -> list[tuple[str, str, list[str], str]]:
    """(name, entry, args, expected text in the error line) for every bad input the CLIs must refuse."""
    s = d.samples_reference()
    run = d.reference()["root"]
    cfg = str(run.parent / f"{run.name}.yaml")
    last = str(run / "checkpoints" / "last.ckpt")
    files = d.work / "bad_files"
    files.mkdir(exist_ok=True)
    (files / "empty.ckpt").write_bytes(b"")
    (files / "text.ckpt").write_text("not a checkpoint\n")
    (files / "truncated.ckpt").write_bytes(Path(last).read_bytes()[:5000])
    crafted = load(s["A"])
    crafted["hyper_parameters"]["model"] = "GSPN-Q/9"
    torch.save(crafted, files / "preset.ckpt")
    crafted["hyper_parameters"].update(model="GSPN-T/2", num_classes=-3)
    torch.save(crafted, files / "classes.ckpt")
    (files / "not_a_dir").write_text("")
    fit = ["fit", "--config", cfg]
    cases = [
        ("lr abc", "train", [*fit, "--model.lr", "abc"], "model.lr"),
        ("diffusion foo", "train", [*fit, "--model.diffusion", "foo"], "model.diffusion"),
        ("batch_size 2.5", "train", [*fit, "--data.init_args.batch_size", "2.5"], "batch_size"),
        ("warmup_steps -5", "train", [*fit, "--model.warmup_steps", "-5"], "warmup_steps"),
        ("min_lr_ratio 5", "train", [*fit, "--model.min_lr_ratio", "5"], "min_lr_ratio"),
        ("lr 1e30", "train", [*fit, "--model.lr", "1e30"], "lr"),
        ("unwritable default_root_dir", "train",
         [*fit, "--trainer.default_root_dir", str(files / "not_a_dir" / "run")], "default_root_dir"),
        ("fashion-mnist root missing", "train",
         [*fit, "--data", "gspn_gen.data.datamodule.FashionMNISTDataModule", "--data.init_args.root",
          str(files / "missing")], "missing"),
        ("torchvision root missing", "train",
         [*fit, "--data", "gspn_gen.data.datamodule.TorchvisionDataModule", "--data.init_args.name", "MNIST",
          "--data.init_args.root", str(files / "missing")], "missing"),
        ("accelerator gpu without GPU", "train", [*fit, "--trainer.accelerator", "gpu"], "accelerator"),
        ("--weights_only false", "train", [*fit, "--ckpt_path", "last", "--weights_only", "false"], "weights_only"),
        ("resume: other preset", "train", [*fit, "--ckpt_path", last, "--model.model", "DiT-T/2"], "model"),
        ("resume: other model_args", "train",
         [*fit, "--ckpt_path", last, "--model.model_args", "{hidden_size: 32, depth: 3, num_heads: 2}"],
         "model_args"),
        ("resume: other image size", "train", [*fit, "--ckpt_path", last, "--data.init_args.image_size", "16"],
         "input_size"),
        ("resume: other diffusion", "train", [*fit, "--ckpt_path", last, "--model.diffusion", "FlowMatching"],
         "diffusion"),
    ]
    for kind in ("missing", "empty", "text", "truncated", "preset", "classes"):
        path = str(files / f"{kind}.ckpt")
        expected = {"missing": "does not exist", "empty": "empty", "text": "not a torch checkpoint",
                    "truncated": "truncated", "preset": "GSPN-Q/9", "classes": "num_classes"}[kind]
        cases.append((f"--ckpt_path {kind} checkpoint", "train", [*fit, "--ckpt_path", path],
                      "-3" if kind == "classes" else expected))
        cases.append((f"sample.py --ckpt {kind} checkpoint", "sample",
                      ["--ckpt", path, "--out", str(files / "g.png")],
                      "negative dimension" if kind == "classes" else expected))
    grid = ["--ckpt", str(s["A"]), "--out", str(files / "g.png")]
    cases += [
        ("--device tpu", "sample", [*grid, "--device", "tpu"], "tpu"),
        ("--cfg-scale 1e30", "sample", [*grid, "--cfg-scale", "1e30"], "cfg-scale"),
        ("--cfg-scale -5", "sample", [*grid, "--cfg-scale", "-5"], "cfg-scale"),
        ("--out g.gif", "sample", ["--ckpt", str(s["A"]), "--out", str(files / "g.gif")], ".png"),
    ]
    if not torch.cuda.is_available():
        cases.append(("--device cuda without GPU", "sample", [*grid, "--device", "cuda"], "cuda"))
    ref = str(_fid_reference_stats(d))
    fid = ["--samples", str(s["npz"]), "--ref", ref, "--extractor", "digits", "--device", "cpu", "--no-progress",
           "--no-cache"]
    labels_out_of_range = files / "labels99.npz"
    np.savez(labels_out_of_range, arr_0=s["arrays"]["arr_0"], arr_1=np.full(len(s["arrays"]["arr_1"]), 99))
    cases += [
        ("fid_eval --num-samples 0", "fid", [*fid, "--num-samples", "0"], "num-samples"),
        ("fid_eval --kid-subsets 0", "fid", [*fid, "--metrics", "kid", "--kid-subsets", "0"], "kid-subsets"),
        ("fid_eval --kid-subset-size 0", "fid", [*fid, "--metrics", "kid", "--kid-subset-size", "0"],
         "kid-subset-size"),
        ("fid_eval --prc-k 0", "fid", [*fid, "--metrics", "prc", "--prc-k", "0"], "prc-k"),
        ("fid_eval labels out of range", "fid",
         ["--samples", str(labels_out_of_range), *fid[2:], "--metrics", "isc"], "label"),
    ]
    return cases


def drill_bad_inputs(d: Drill, runs: int) -> tuple[int, list[str]]:
    failures = []
    run = d.reference()["root"]
    before = tree_digest(run)
    cases = bad_input_cases(d)
    for name, entry, args, expected in cases:
        for _ in range(runs):
            proc = d.run(entry, args)
            problem = one_error_line(proc, 2, expected)
            if problem:
                failures.append(f"{name}: {problem}")
        if entry == "train" and tree_digest(run) != before:
            failures.append(f"{name}: the run directory was modified")
            before = tree_digest(run)
    return runs * len(cases), failures


def drill_pickles(d: Drill, runs: int) -> tuple[int, list[str]]:
    """Every file input gets a malicious pickle; none may run it."""
    failures = []
    marker = d.work / "PICKLE_RAN"
    files = write_malicious_files(d.work / "evil", marker)
    s = d.samples_reference()
    evil_run = d.work / "evil_run"
    cfg = str(tiny_config(evil_run, d.steps))
    (evil_run / "checkpoints").mkdir(parents=True, exist_ok=True)
    shutil.copy(files["checkpoint"], evil_run / "checkpoints" / "last.ckpt")
    shard_out = d.work / "evil_shards" / "samples.npz"
    ref = str(_fid_reference_stats(d))
    fid = ["--extractor", "digits", "--device", "cpu", "--no-progress", "--no-cache"]
    cases = [
        ("sample.py --ckpt", "sample", ["--ckpt", str(files["checkpoint"]), "--out", str(d.work / "e.png")], 2),
        ("fit --ckpt_path FILE", "train", ["fit", "--config", cfg, "--ckpt_path", str(files["checkpoint"])], 2),
        ("fit --ckpt_path FILE --weights_only false", "train",
         ["fit", "--config", cfg, "--ckpt_path", str(files["checkpoint"]), "--weights_only", "false"], 2),
        ("fit --ckpt_path last", "train", ["fit", "--config", cfg, "--ckpt_path", "last"], 2),
        ("fit --ckpt_path last --weights_only false", "train",
         ["fit", "--config", cfg, "--ckpt_path", "last", "--weights_only", "false"], 2),
        ("sample.py shard in OUT.parts", "sample", d.sample_args(s["A"], shard_out), 0),
        ("fid_eval --samples npz object arrays", "fid", ["--samples", str(files["npz_object_array"]), "--ref", ref,
                                                         *fid], 2),
        ("fid_eval --ref stats .pt", "fid", ["--samples", str(s["npz"]), "--ref", str(files["stats_pt"]), *fid], 2),
        ("fid_eval --ref stats .npz object arrays", "fid",
         ["--samples", str(s["npz"]), "--ref", str(files["stats_npz"]), *fid], 2),
        ("fid_eval --weights", "fid", ["--samples", str(s["npz"]), "--ref", ref, *fid, "--weights",
                                       str(files["extractor_weights"])], 2),
    ]
    for _ in range(runs):
        for name, entry, args, code in cases:
            if entry == "sample" and "--num-samples" in args:  # a foreign shard waits in the parts folder
                parts = Path(f"{shard_out}.parts")
                shutil.rmtree(parts, ignore_errors=True)
                shard_out.unlink(missing_ok=True)
                parts.mkdir(parents=True)
                shutil.copy(files["shard"], parts / "shard-00000.npz")
            proc = d.run(entry, args)
            if marker.exists():
                failures.append(f"{name}: THE PICKLE RAN")
                marker.unlink()
            problem = (one_error_line(proc, 2) if code == 2 else
                       (f"exit {proc.returncode}: {last_lines(proc.stderr)}" if proc.returncode else None))
            if problem:
                failures.append(f"{name}: {problem}")
    return runs * len(cases), failures


DRILLS = {
    "kill_random": (drill_kill_random, 12),
    "kill_in_write": (drill_kill_in_write, 10),
    "full_disk": (drill_full_disk, 3),
    "blown_up_weights": (drill_blown_up_weights, 2),
    "kill_sampling": (drill_kill_sampling, 5),
    "kill_assembly": (drill_kill_assembly, 4),
    "replaced_checkpoint": (drill_replaced_checkpoint, 2),
    "bad_shards": (drill_bad_shards, 4),
    "nan_checkpoint": (drill_nan_checkpoint, 1),
    "fid_nonfinite": (drill_fid_nonfinite, 1),
    "bad_inputs": (drill_bad_inputs, 1),
    "pickles": (drill_pickles, 1),
}


def main(argv: list[str] | None = None) -> dict:
    from gspn_gen.fileio import write_json
    from gspn_gen.report import cpu_name, slug

    p = argparse.ArgumentParser(prog="python benchmarks/fault_drill.py", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one run of each drill")
    p.add_argument("--only", default=None, help=f"comma list of drills ({', '.join(DRILLS)})")
    p.add_argument("--work", type=Path, default=None, help="scratch directory (default: a new temp directory)")
    p.add_argument("--json", type=Path, default=None, help="output JSON (default benchmarks/results/...)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random kill moments")
    args = p.parse_args(argv)
    names = args.only.split(",") if args.only else list(DRILLS)
    unknown = [n for n in names if n not in DRILLS]
    if unknown:
        p.error(f"unknown drill(s) {unknown}; known: {', '.join(DRILLS)}")
    work = args.work or Path(tempfile.mkdtemp(prefix="fault-drill-"))
    work.mkdir(parents=True, exist_ok=True)
    d = Drill(work, seed=args.seed)
    start, rows = time.perf_counter(), []
    print(f"{cpu_name()}, {os.cpu_count()} CPUs; work dir {work}; TMPDIR on another filesystem: {d.other_fs}",
          flush=True)
    print(f"{'drill':22} {'runs':>5} {'failures':>9}  {'seconds':>8}", flush=True)
    for name in names:
        fn, runs = DRILLS[name]
        runs = 1 if args.quick else runs
        t0 = time.perf_counter()
        try:
            made, failures = fn(d, runs)
        except Exception as e:  # noqa: BLE001 - a drill that cannot run is reported, the others still run
            made, failures = 0, [f"drill crashed: {type(e).__name__}: {e}"]
        row = {"drill": name, "runs": made, "failures": len(failures), "details": failures,
               "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(f"{name:22} {row['runs']:>5} {row['failures']:>9}  {row['seconds']:>8}", flush=True)
        for line in failures:
            print(f"    - {line}", flush=True)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
    result = {
        "benchmark": "benchmarks/fault_drill.py", "machine": cpu_name(), "cpus": os.cpu_count(),
        "platform": platform.platform(), "torch": torch.__version__,
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "tmpdir_other_fs": str(d.other_fs), "quick": args.quick, "seed": args.seed,
        "settings": {"training": "GSPN-T/2 (width 32, depth 2) on 8x8 digits, batch 8, checkpoint every step",
                     "steps": d.steps, "samples": d.samples, "shard_size": 4},
        "wall_s": round(time.perf_counter() - start, 1),
        "cpu_s": round(sum(u.ru_utime + u.ru_stime for u in usage), 1),
        "note": "shared 2-core machine: wall time is inflated by other users; runs and failures are what count",
        "kills": sum(r["runs"] for r in rows if r["drill"] in ("kill_random", "kill_in_write")),
        "drills": rows,
    }
    path = args.json or REPO / "benchmarks" / "results" / f"fault-drill-{slug(cpu_name())}-{dt.date.today()}.json"
    write_json(path, result)
    print(f"wrote {path} ({result['wall_s']} s wall, {result['cpu_s']} s CPU)")
    return result


if __name__ == "__main__":
    main()
