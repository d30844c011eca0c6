"""Fault drill: kills at random steps, signals, concurrent runs, overwrites, a full disk, replaced checkpoints,
NaN files, huge requests and malicious pickles, on the digits recipe.

    python benchmarks/fault_drill.py                     # every drill: ~25 CPU-minutes, about an hour on a busy 2-core box
    python benchmarks/fault_drill.py --quick             # one run of each drill
    python benchmarks/fault_drill.py --only kill_in_write,pickles --work /tmp/drill

Prints a table drill -> runs -> failures (with what failed) and writes
benchmarks/results/fault-drill-<machine>-<date>.json. The training recipe has 3 batches per epoch and a
checkpoint every step, so kills and signals land mid-epoch as often as not. A run fails when its invariant
does not hold:

  kill_random, kill_in_write   kill -9 at a random moment of training / half-way through a checkpoint write
                               (half of the runs with TMPDIR on another filesystem, /dev/shm): the newest
                               checkpoint loads, `--ckpt_path last` resumes to exactly the unbroken run's
                               weights, EMA, optimiser state, LR schedule and data position, metrics.csv holds
                               each step once with the unbroken run's losses, no temp file is left
  kill_ddp                     the same with 2-process CPU DDP (the whole process group killed), against an
                               unbroken DDP run
  signals                      SIGTERM / SIGINT at a random moment of training (or of start-up): exit 143 / 130,
                               no traceback, last.ckpt at the step the message names, an exact resume
  concurrent                   two trainings into one run directory, two sample.py on one .npz, a stale lock
                               of a killed training: one runs, the other exits 2 naming it; logs and
                               checkpoints equal the unbroken run's
  overwrite                    sample.py (.npz, .png), fid_eval --out and stats --out, import-dit --out, the
                               sweep folder, a fresh training into a used run directory: refused, exit 2,
                               the file untouched; with --overwrite replaced
  symlinked_last               last.ckpt a symlink to an older checkpoint: the resume replaces the link by
                               the file (exact), the target is untouched, no last-v1.ckpt
  unwritable_out               outputs under a file, in /proc (and a read-only folder when not root): one
                               error line, exit 2, before any sampling
  huge_requests                --num-samples 1e9, a 1e8-image grid, --steps 100000, max_steps 0: refused with
                               the numbers, nothing written
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
"""

from __future__ import annotations

import argparse
import csv
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


BATCHES_PER_EPOCH = 3


def tiny_config(root: Path, steps: int, seed: int = 0, keep_steps: bool = False, devices: int = 1) -> Path:
    """The digits recipe at drill size: 2-layer GSPN-T/2 at 8x8, three batches per epoch, last.ckpt every step
    (with `keep_steps` also step=N.ckpt), one CPU process or `devices` DDP processes."""
    checkpoint = {"save_top_k": -1, "filename": "{step}"} if keep_steps else {"save_top_k": 0}
    cfg = {
        "seed_everything": seed,
        "trainer": {
            "accelerator": "cpu", "devices": devices, "max_steps": steps, "default_root_dir": str(root),
            "limit_train_batches": BATCHES_PER_EPOCH, "limit_val_batches": 0, "log_every_n_steps": 1,
            "enable_progress_bar": False, "enable_model_summary": False, "gradient_clip_val": 1.0,
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {**checkpoint, "save_last": True, "every_n_train_steps": 1}}],
            **({"strategy": "ddp"} if devices > 1 else {}),
        },
        "model": {"model": "GSPN-T/2", "model_args": {"hidden_size": 32, "depth": 2, "num_heads": 2},
                  "optim": {"lr": 1e-3, "warmup_steps": 2, "lr_schedule": "cosine"}, "ema_args": {"decay": 0.9}},
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
        self._reference_ddp: dict | None = None
        self._samples: dict | None = None
        self.resumes: list[dict] = []  # every resume after a kill or signal: from which step, exact or not

    # ------------------------------------------------------------ processes
    def command(self, entry: str, args: list[str], fault: str = "none") -> list[str]:
        if entry == "fid":
            return [sys.executable, "-m", "fid_eval", *args]
        if entry == "convert":
            return [sys.executable, "-m", "gspn_gen.checkpoints", *args]
        if entry == "sweep":
            return [sys.executable, "-m", "gspn_gen.sweep", *args]
        return [sys.executable, "-c", DRIVER, entry, *args] if fault != "none" else \
            [sys.executable, {"train": "train_gen.py", "sample": "sample.py"}[entry], *args]

    def run(self, entry: str, args: list[str], fault: str = "none", tmpdir: Path | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
        env = {**self.env, "DRILL_FAULT": fault, **({"TMPDIR": str(tmpdir)} if tmpdir else {})}
        return subprocess.run(self.command(entry, args, fault), cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def spawn(self, entry: str, args: list[str], tmpdir: Path | None = None, group: bool = False) -> subprocess.Popen:
        """Start a process (stderr to a file, read with `stderr_of`); `group`: in its own process group."""
        env = {**self.env, **({"TMPDIR": str(tmpdir)} if tmpdir else {})}
        err = tempfile.TemporaryFile(mode="w+", dir=self.work)  # noqa: SIM115 - closed by the caller
        p = subprocess.Popen(self.command(entry, args), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err,
                             text=True, start_new_session=group)
        p.err_file = err
        return p

    def tmpdir(self, name: str, other_fs: bool) -> Path:
        base = self.other_fs if other_fs and self.other_fs else self.work
        path = Path(tempfile.mkdtemp(prefix=f"drill-{name}-", dir=base))
        return path

    # ------------------------------------------------------------ references
    def reference(self, devices: int = 1) -> dict:
        """An unbroken training run (one process, or `devices` DDP processes): its last checkpoint, its
        per-step checkpoints (one process), its logged losses and how long its steps take."""
        cached = self._reference if devices == 1 else self._reference_ddp
        if cached is not None:
            return cached
        root = self.work / ("reference" if devices == 1 else f"reference-ddp{devices}")
        start = time.perf_counter()
        p = self.spawn("train", ["fit", "--config", str(tiny_config(root, self.steps, keep_steps=devices == 1,
                                                                      devices=devices))])
        first = wait_for(lambda: (root / "checkpoints" / "last.ckpt").exists() or p.poll() is not None, 900)
        first_at = time.perf_counter()
        p.wait(900)
        if p.returncode != 0:
            raise RuntimeError(f"reference training failed: {stderr_of(p)[-2000:]}")
        ckpt = load(root / "checkpoints" / "last.ckpt")
        # from the first checkpoint to the last one: when a kill or signal lands in training, not in the exit
        trained = (root / "checkpoints" / "last.ckpt").stat().st_mtime - (time.time() - (time.perf_counter() - first_at))
        ref = {"root": root, "ckpt": ckpt, "state": ckpt["state_dict"], "step": ckpt["global_step"],
               "losses": logged_losses(root / "metrics.csv"),
               "train_s": max(trained, 0.2) if first else 1.0, "startup_s": first_at - start}
        if devices == 1:
            self._reference = ref
        else:
            self._reference_ddp = ref
        return ref

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
    def check_resume(self, root: Path, tmpdir: Path | None, tmp_before: set, devices: int = 1) -> list[str]:
        """After a kill or signal: the newest checkpoint loads, `--ckpt_path last` resumes to exactly the unbroken
        run's state and logged losses, each step is logged once, no temp file is left."""
        problems = []
        last = root / "checkpoints" / "last.ckpt"
        start = None
        if last.exists():
            try:
                start = load(last)["global_step"]
            except Exception as e:  # noqa: BLE001 - any failure is what the drill counts
                problems.append(f"last.ckpt unloadable (corrupt) after the kill: {type(e).__name__}")
        proc = self.run("train", ["fit", "--config", str(root.parent / f"{root.name}.yaml"), "--ckpt_path", "last"],
                        tmpdir=tmpdir)
        if proc.returncode != 0:
            return problems + [f"resume exit {proc.returncode}: {last_lines(proc.stderr)}"]
        if "Traceback" in proc.stderr:
            problems.append(f"traceback in the resume: {last_lines(proc.stderr, 1)}")
        ref = self.reference(devices)
        differ = training_state_problems(ref["ckpt"], load(last))
        problems += differ
        problems += log_problems(root / "metrics.csv", ref["losses"], since=0)
        self.resumes.append({"root": root.name, "from_step": start, "devices": devices, "exact": not differ,
                             "mid_epoch": start is not None and start % BATCHES_PER_EPOCH != 0})
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


def wait_for_step(root: Path, step: int, p: subprocess.Popen, timeout: float = 900) -> bool:
    """Wait until the run in `root` has logged `step` steps (one metrics.csv row each) or has ended."""
    path = root / "metrics.csv"

    def reached() -> bool:
        try:
            return path.read_text().count("\n") - 1 >= step
        except OSError:
            return False

    return wait_for(lambda: reached() or p.poll() is not None, timeout, poll=0.005)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def npz_arrays(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def csv_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def logged_losses(path: Path) -> dict[int, str]:
    """Step -> train/loss as metrics.csv holds it (text: compared exactly)."""
    return {int(r["step"]): r["train/loss"] for r in csv_rows(path) if r.get("train/loss") and r["step"].isdigit()}


def log_problems(path: Path, want: dict[int, str], since: int = 0) -> list[str]:
    """metrics.csv is whole (every row fits the header), logs each step once, and holds `want`'s losses
    from step `since` on."""
    rows = csv_rows(path)
    problems = []
    if any(None in r or None in r.values() for r in rows):
        problems.append("metrics.csv corrupt: a row does not fit the header")
    steps = [int(r["step"]) for r in rows if r.get("train/loss") and r.get("step", "").isdigit()]
    repeated = sorted({s for s in steps if steps.count(s) > 1})
    if repeated:
        problems.append(f"metrics.csv logs steps {repeated[:5]} more than once")
    got = logged_losses(path)
    lost = sorted(s for s in want if s >= since and s not in got)
    if lost:
        problems.append(f"metrics.csv lost the rows of steps {lost[:8]}")
    wrong = sorted(s for s in want if s >= since and s in got and got[s] != want[s])
    if wrong:
        problems.append(f"logged losses differ from the unbroken run at steps {wrong[:8]}")
    return problems


def training_state_problems(ref: dict, ckpt: dict) -> list[str]:
    """How a checkpoint differs from the unbroken run's: step, weights and EMA, optimiser, schedule, data order."""
    if ckpt["global_step"] != ref["global_step"]:
        return [f"resumed to step {ckpt['global_step']}, not {ref['global_step']}"]
    problems = []
    state = ckpt["state_dict"]
    differ = [k for k, v in ref["state_dict"].items() if k not in state or not torch.equal(v, state[k])]
    if differ:
        problems.append(f"resume not exact: {len(differ)} tensors differ (e.g. {differ[0]})")
    theirs, ours = ref["optimizer_states"][0], ckpt["optimizer_states"][0]
    opt = [(i, k) for i, st in theirs["state"].items() for k, v in st.items()
           if not torch.equal(v, ours["state"].get(i, {}).get(k, torch.empty(0)))]
    if opt or theirs["param_groups"] != ours["param_groups"]:
        problems.append(f"resume not exact: optimiser state differs ({len(opt)} tensors)")
    if ref["lr_schedulers"] != ckpt["lr_schedulers"]:
        problems.append("resume not exact: LR schedule state differs")
    loader = [c["loops"]["fit_loop"]["state_dict"].get("combined_loader") for c in (ref, ckpt)]
    if loader[0] != loader[1]:
        problems.append(f"data position differs: {loader[1]} instead of {loader[0]}")
    return problems


def stderr_of(p: subprocess.Popen) -> str:
    p.err_file.seek(0)
    return p.err_file.read()


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
        wait_for_step(root, d.rng.randint(1, d.steps - 1), p)
        time.sleep(d.rng.uniform(0, ref["train_s"] / d.steps))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait()
            p.err_file.close()
            landed += _interrupted(root, d.steps)  # a kill after the last step interrupted nothing: not counted
            problems = d.check_resume(root, tmp, before)
            failures += [f"run {i} (TMPDIR {tmp.parent}): {msg}" for msg in problems]
        else:
            p.wait()
            p.err_file.close()
    return landed, failures


def _interrupted(root: Path, steps: int) -> bool:
    """Whether the run in `root` stopped before its last step (its last.ckpt, if any, is of an earlier one)."""
    last = root / "checkpoints" / "last.ckpt"
    try:
        return load(last)["global_step"] < steps if last.exists() else True
    except Exception:  # noqa: BLE001 - unreadable: interrupted in the middle of writing it
        return True


def drill_kill_in_write(d: Drill, runs: int) -> tuple[int, list[str]]:
    """kill -9 half-way through writing checkpoint k (the temp file holds a random fraction of it)."""
    failures = []
    d.reference()
    for i in range(runs):
        root = d.work / f"kill_in_write-{i}"
        tmp = d.tmpdir(f"kw{i}", other_fs=(i % 2 == 1) != d.other_fs_first)
        before = set(os.listdir(tmp))
        k, frac = d.rng.randint(2, d.steps - 1), d.rng.uniform(0.05, 0.95)
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
        k = d.rng.randint(2, d.steps - 1)
        proc = d.run("train", ["fit", "--config", str(tiny_config(root, d.steps))], f"enospc_save:{k}:0.5")
        problems = [p for p in [one_error_line(proc, 1, "No space left")] if p]
        if not problems and "last.ckpt" not in proc.stderr:
            problems.append("the error line does not name the checkpoint path")
        try:
            step = load(root / "checkpoints" / "last.ckpt")["global_step"]
            if step != k - 1:  # save k is the checkpoint of step k
                problems.append(f"last.ckpt is from step {step}, expected {k - 1}")
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


def drill_kill_ddp(d: Drill, runs: int) -> tuple[int, list[str]]:
    """kill -9 of a 2-process DDP training (the whole process group) at a random moment, then a DDP resume."""
    failures, landed = [], 0
    ref = d.reference(devices=2)
    for i in range(runs):
        root = d.work / f"kill_ddp-{i}"
        p = d.spawn("train", ["fit", "--config", str(tiny_config(root, d.steps, devices=2))], group=True)
        wait_for_step(root, d.rng.randint(1, d.steps - 1), p)
        time.sleep(d.rng.uniform(0, ref["train_s"] / d.steps))
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            wait_for(lambda pid=p.pid: not _group_alive(pid), 30)
            landed += _interrupted(root, d.steps)
            failures += [f"run {i}: {msg}" for msg in d.check_resume(root, None, set(), devices=2)]
        else:
            p.wait()
        p.err_file.close()
    return landed, failures


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def drill_signals(d: Drill, runs: int) -> tuple[int, list[str]]:
    """SIGTERM or SIGINT at a random moment of training (every third pair: of start-up): exit 143 / 130, no
    traceback, last.ckpt at the step the message names, `--ckpt_path last` then resumes exactly."""
    failures, landed = [], 0
    ref = d.reference()
    for i in range(2 * runs):
        sig = (signal.SIGTERM, signal.SIGINT)[i % 2]
        early = (i // 2) % 3 == 2
        root = d.work / f"signal-{i}"
        p = d.spawn("train", ["fit", "--config", str(tiny_config(root, d.steps))])
        if early:
            time.sleep(d.rng.uniform(0.5, max(ref["startup_s"] * 0.8, 0.6)))
        else:
            wait_for_step(root, d.rng.randint(1, d.steps - 1), p)
            time.sleep(d.rng.uniform(0, ref["train_s"] / d.steps))
        if p.poll() is not None:  # finished first: no signal was sent
            p.wait()
            p.err_file.close()
            continue
        p.send_signal(sig)
        p.wait(600)
        err = stderr_of(p)
        p.err_file.close()
        name = f"run {i} ({signal.Signals(sig).name}{', start-up' if early else ''})"
        last = root / "checkpoints" / "last.ckpt"
        step = load(last)["global_step"] if last.exists() else None
        problems = []
        if step == d.steps:  # the signal came as the finished run was exiting: nothing was stopped
            if p.returncode not in (0, 128 + sig, -sig):
                problems.append(f"exit {p.returncode} after the last step: {last_lines(err)}")
        else:
            landed += 1
            if p.returncode == 0:
                problems.append(f"exit-0 stop at step {step}")
            elif p.returncode != 128 + sig:
                problems.append(f"exit {p.returncode}, expected {128 + sig}: {last_lines(err)}")
        if "Traceback" in err:
            problems.append(f"traceback: {last_lines(err, 1)}")
        said = re.search(r"after global step (\d+)", err)
        if p.returncode == 128 + sig and said and int(said.group(1)) != step:
            problems.append(f"the message names step {said.group(1)}, last.ckpt holds step {step}")
        problems += d.check_resume(root, None, set())
        failures += [f"{name}: {msg}" for msg in problems]
    return landed, failures


def drill_concurrent(d: Drill, runs: int) -> tuple[int, list[str]]:
    """Two trainings into one run directory, two sample.py on one .npz (started together), and a training
    over the stale lock of a killed one: one writer, the other refused in one line; nothing corrupted."""
    failures = []
    ref, s = d.reference(), d.samples_reference()
    for i in range(runs):
        root = d.work / f"concurrent-{i}"
        config = str(tiny_config(root, d.steps))
        procs = [d.spawn("train", ["fit", "--config", config]) for _ in range(2)]
        for p in procs:
            p.wait(900)
        problems = _one_ran_one_refused(procs, "in use by another process")
        if (root / "checkpoints" / "last.ckpt").exists():
            problems += training_state_problems(ref["ckpt"], load(root / "checkpoints" / "last.ckpt"))
        else:
            problems.append("no last.ckpt: neither training finished")
        problems += log_problems(root / "metrics.csv", ref["losses"])
        failures += [f"run {i} (two trainings): {m}" for m in problems]

        out = d.work / f"concurrent-{i}" / "samples.npz"
        procs = [d.spawn("sample", d.sample_args(s["A"], out)) for _ in range(2)]
        for p in procs:
            p.wait(900)
        problems = _one_ran_one_refused(procs, "in use by another process")
        problems += d.check_samples(out) if out.exists() else ["no .npz: neither sampling run finished"]
        failures += [f"run {i} (two sample.py): {m}" for m in problems]

        stale = d.work / f"stale-{i}"
        config = str(tiny_config(stale, 2))
        victim = d.spawn("train", ["fit", "--config", config])
        lock = stale / ".gspn-gen.lock"
        wait_for(lambda lock=lock, victim=victim: (lock.exists() and lock.stat().st_size > 0) or victim.poll() is not None,
                 600)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        victim.err_file.close()
        proc = d.run("train", ["fit", "--config", config, "--ckpt_path", "last"])
        problems = [] if proc.returncode == 0 else [f"exit {proc.returncode}: {last_lines(proc.stderr)}"]
        if "taken over from a training that ended without releasing it" not in proc.stderr:
            problems.append("the stale lock was not reported")
        if (stale / ".gspn-gen.lock").exists():
            problems.append("the lock file stays after the run")
        failures += [f"run {i} (stale lock): {m}" for m in problems]
    return 3 * runs, failures


def _one_ran_one_refused(procs: list[subprocess.Popen], expected: str) -> list[str]:
    errs = [stderr_of(p) for p in procs]
    for p in procs:
        p.err_file.close()
    codes = sorted(p.returncode for p in procs)
    problems = [f"traceback: {last_lines(e, 1)}" for e in errs if "Traceback" in e]
    if codes != [0, 2]:
        return problems + [f"exit codes {codes}, expected one 0 and one 2: {[last_lines(e) for e in errs]}"]
    refused = errs[[p.returncode for p in procs].index(2)]
    lines = [line for line in refused.splitlines() if ERROR_LINE.match(line)]
    if len(lines) != 1 or expected not in lines[0] or "pid " not in lines[0]:
        problems.append(f"the refusal is not one line naming the holder: {last_lines(refused)}")
    return problems


def _official_dit(path: Path) -> Path:
    """A random DiT-T/2 (8x8, 1000 classes) in the official DiT state-dict layout."""
    from gspn_gen.models.zoo import build_model

    if not path.exists():
        torch.manual_seed(0)
        model = build_model("DiT-T/2", input_size=8, depth=2)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({k.replace(".mixer.", ".attn."): v for k, v in model.state_dict().items()}, path)
    return path


def drill_overwrite(d: Drill, runs: int) -> tuple[int, list[str]]:
    """Every command that writes a result, aimed at an existing one without --overwrite: refused, untouched."""
    failures = []
    s, ref = d.samples_reference(), d.reference()
    base = d.work / "overwrite"
    base.mkdir(exist_ok=True)
    dit = _official_dit(base / "DiT-T-2.pt")
    used = base / "used-run"
    if not used.exists():
        shutil.copytree(ref["root"], used)
    fid = ["--extractor", "digits", "--device", "cpu", "--no-progress"]
    cases = [
        ("sample.py .npz", "sample", lambda out: d.sample_args(s["A"], out), "s.npz"),
        ("sample.py .png", "sample", lambda out: ["--ckpt", str(s["A"]), "--classes", "1", "--steps", "1",
                                                  "--out", str(out)], "g.png"),
        ("fid_eval --out", "fid", lambda out: ["--samples", str(s["npz"]), "--ref", "digits:val", *fid,
                                               "--out", str(out)], "r.json"),
        ("fid_eval stats --out", "fid", lambda out: ["stats", "--input", "digits:val", *fid, "--out", str(out)],
         "st.npz"),
        ("import-dit --out", "convert", lambda out: ["import-dit", str(dit), "--out", str(out)], "dit.ckpt"),
        ("sweep --out (a folder of other files)", "sweep",
         lambda out: ["--ckpt", str(s["A"]), "--cfg-scale", "1", "--num-samples", "10", "--steps", "1",
                      "--ref", "digits:val", "--extractor", "digits", "--device", "cpu", "--out", str(out.parent)],
         "notes.txt"),
    ]
    for _ in range(runs):
        for name, entry, argv, filename in cases:
            folder = Path(tempfile.mkdtemp(prefix="ow-", dir=base))
            target = folder / filename
            target.write_bytes(b"a result of the user's")
            proc = d.run(entry, argv(target))
            problems = [p for p in [one_error_line(proc, 2, "overwrite")] if p]
            if target.read_bytes() != b"a result of the user's":
                problems.append("silent overwrite: the file was replaced")
            if sorted(p.name for p in folder.iterdir()) != [filename]:
                problems.append(f"left files: {sorted(p.name for p in folder.iterdir())}")
            if entry != "sweep":  # with --overwrite it is replaced
                proc = d.run(entry, [*argv(target), "--overwrite"])
                if proc.returncode != 0 or target.read_bytes() == b"a result of the user's":
                    problems.append(f"--overwrite did not replace it (exit {proc.returncode}: {last_lines(proc.stderr)})")
            failures += [f"{name}: {p}" for p in problems]
        before = tree_digest(used)
        proc = d.run("train", ["fit", "--config", str(ref["root"].parent / "reference.yaml"),
                               "--trainer.default_root_dir", str(used)])
        problems = [p for p in [one_error_line(proc, 2, "--ckpt_path last")] if p]
        if tree_digest(used) != before:
            problems.append("silent overwrite: the used run directory changed")
        failures += [f"fresh training into a used run directory: {p}" for p in problems]
    return runs * (len(cases) + 1), failures


def drill_symlinked_last(d: Drill, runs: int) -> tuple[int, list[str]]:
    """last.ckpt is a symlink to an older checkpoint of the run: the resume replaces the link (exactly), never
    writing through it or beside it (last-v1.ckpt)."""
    failures = []
    ref = d.reference()
    for i in range(runs):
        root = d.work / f"symlinked-{i}"
        tiny_config(root, d.steps)
        k = d.rng.randint(1, d.steps - 1)
        ckpts = root / "checkpoints"
        ckpts.mkdir(parents=True, exist_ok=True)
        shutil.copy(ref["root"] / "checkpoints" / f"step={k}.ckpt", ckpts / "kept.ckpt")
        (ckpts / "last.ckpt").symlink_to("kept.ckpt")
        kept = hashlib.sha256((ckpts / "kept.ckpt").read_bytes()).hexdigest()
        last = ckpts / "last.ckpt"
        proc = d.run("train", ["fit", "--config", str(root.parent / f"{root.name}.yaml"), "--ckpt_path", "last"])
        problems = [] if proc.returncode == 0 else [f"exit {proc.returncode}: {last_lines(proc.stderr)}"]
        if last.is_symlink():
            problems.append("last.ckpt is still the link (stale)")
        elif last.exists():
            problems += training_state_problems(ref["ckpt"], load(last))
        if hashlib.sha256((ckpts / "kept.ckpt").read_bytes()).hexdigest() != kept:
            problems.append("the link's target was written through")
        versioned = [p.name for p in ckpts.glob("last-v*.ckpt")]
        if versioned:
            problems.append(f"versioned copies beside it: {versioned}")
        problems += log_problems(root / "metrics.csv", ref["losses"], since=k)
        failures += [f"run {i} (from step {k}): {p}" for p in problems]
    return runs, failures


def drill_unwritable_out(d: Drill, runs: int) -> tuple[int, list[str]]:
    """Outputs that cannot be written: one error line, exit 2, before any sample is drawn."""
    failures = []
    s = d.samples_reference()
    base = d.work / "unwritable"
    base.mkdir(exist_ok=True)
    (base / "a_file").write_text("")
    places = [base / "a_file", Path("/proc/gspn-gen-drill")]
    if os.geteuid() != 0:  # root writes into read-only folders
        (base / "read_only").mkdir(mode=0o555, exist_ok=True)
        places.append(base / "read_only")
    dit = _official_dit(d.work / "overwrite" / "DiT-T-2.pt")
    cases = []
    for place in places:
        cases += [
            (f"sample.py .npz in {place}", "sample", d.sample_args(s["A"], place / "s.npz")),
            (f"sample.py .png in {place}", "sample", ["--ckpt", str(s["A"]), "--classes", "1", "--out",
                                                      str(place / "g.png")]),
            (f"fid_eval --out in {place}", "fid", ["--samples", str(s["npz"]), "--ref", "digits:val", "--extractor",
                                                   "digits", "--device", "cpu", "--out", str(place / "r.json")]),
            (f"import-dit --out in {place}", "convert", ["import-dit", str(dit), "--out", str(place / "d.ckpt")]),
            (f"training into {place}", "train", ["fit", "--config", str(d.reference()["root"].parent / "reference.yaml"),
                                                 "--trainer.default_root_dir", str(place / "run")]),
        ]
    for _ in range(runs):
        for name, entry, args in cases:
            proc = d.run(entry, args)
            problem = one_error_line(proc, 2)
            if problem:
                failures.append(f"{name}: {problem}")
            elif entry == "sample" and re.search(r"sampling.*img", proc.stderr):
                failures.append(f"{name}: refused only after sampling")
    return runs * len(cases), failures


def drill_huge_requests(d: Drill, runs: int) -> tuple[int, list[str]]:
    """Requests that cannot fit or make no sense: refused with the numbers before anything is written."""
    failures = []
    s, ref = d.samples_reference(), d.reference()
    base = d.work / "huge"
    cases = [
        ("--num-samples 1e9", "sample", lambda f: ["--ckpt", str(s["A"]), "--num-samples", "1000000000", "--out",
                                                   str(f / "s.npz")], "samples fit"),
        ("a grid of 1e8 images", "sample", lambda f: ["--ckpt", str(s["A"]), "--classes", "1", "--per-class",
                                                      "100000000", "--out", str(f / "g.png")], "needs about"),
        ("--steps 100000", "sample", lambda f: ["--ckpt", str(s["A"]), "--num-samples", "8", "--steps", "100000",
                                                "--out", str(f / "s.npz")], "at most 1000"),
        ("--trainer.max_steps 0", "train", lambda f: ["fit", "--config", str(ref["root"].parent / "reference.yaml"),
                                                      "--trainer.default_root_dir", str(f / "run"),
                                                      "--trainer.max_steps", "0"], "nothing to train"),
    ]
    for i in range(runs):
        for name, entry, argv, expected in cases:
            folder = base / f"{i}-{name.split()[0].strip('-')}-{cases.index((name, entry, argv, expected))}"
            folder.mkdir(parents=True, exist_ok=True)
            proc = d.run(entry, argv(folder))
            problem = one_error_line(proc, 2, expected)
            written = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]
            failures += [f"{name}: {p}" for p in [problem] if p]
            if written:
                failures.append(f"{name}: wrote {written[:3]}")
    return runs * len(cases), failures


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
    p.err_file.close()
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
        ("lr abc", "train", [*fit, "--model.optim.lr", "abc"], "model.optim.lr"),
        ("diffusion foo", "train", [*fit, "--model.diffusion", "foo"], "model.diffusion"),
        ("batch_size 2.5", "train", [*fit, "--data.init_args.batch_size", "2.5"], "batch_size"),
        ("warmup_steps -5", "train", [*fit, "--model.optim.warmup_steps", "-5"], "warmup_steps"),
        ("min_lr_ratio 5", "train", [*fit, "--model.optim.min_lr_ratio", "5"], "min_lr_ratio"),
        ("lr 1e30", "train", [*fit, "--model.optim.lr", "1e30"], "lr"),
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
    crafted = load(s["A"])
    crafted["hyper_parameters"]["codec"] = {"name": "jpeg"}
    torch.save(crafted, files / "codec.ckpt")
    crafted = load(s["A"])
    crafted["hyper_parameters"]["model_args"] = {**crafted["hyper_parameters"]["model_args"], "gspn_backend": "bogus"}
    torch.save(crafted, files / "backend.ckpt")
    dit = _official_dit(d.work / "overwrite" / "DiT-T-2.pt")
    (files / "DiT-truncated.pt").write_bytes(dit.read_bytes()[:4000])
    nodrop = torch.load(dit, weights_only=True)
    nodrop["y_embedder.embedding_table.weight"] = nodrop["y_embedder.embedding_table.weight"][:10]
    torch.save(nodrop, files / "DiT-10rows.pt")
    (files / "not_a_vae").mkdir(exist_ok=True)
    distill = str(REPO / "configs" / "experiments" / "distill_dit-t4_to_gspn-t4_digits.yaml")
    cases += [
        ("sample.py: a checkpoint with an unknown codec", "sample", ["--ckpt", str(files / "codec.ckpt"), "--out",
                                                                      str(files / "g.png")], "unknown codec"),
        ("sample.py: a checkpoint with an unknown GSPN backend", "sample",
         ["--ckpt", str(files / "backend.ckpt"), "--out", str(files / "g.png")], "bogus"),
        ("sample.py --vae /missing/dir", "sample", [*grid, "--vae", "/missing/dir"], "does not exist"),
        ("sample.py --steps 100000", "sample", [*grid, "--steps", "100000"], "at most 1000"),
        ("import-dit of a truncated file", "convert", ["import-dit", str(files / "DiT-truncated.pt"), "--out",
                                                       str(files / "t.ckpt")], "truncated"),
        ("import-dit --vae /missing/dir", "convert", ["import-dit", str(dit), "--out", str(files / "v.ckpt"),
                                                      "--vae", "/missing/dir"], "does not exist"),
        ("import-dit --vae of a folder without a VAE", "convert",
         ["import-dit", str(dit), "--out", str(files / "v.ckpt"), "--vae", str(files / "not_a_vae")], "config.json"),
        ("import-dit of a table without a decidable null row", "convert",
         ["import-dit", str(files / "DiT-10rows.pt"), "--out", str(files / "n.ckpt")], "--num-classes"),
        ("a missing teacher beside student checkpoints only", "train",
         ["fit", "--config", distill, "--model.distill.teacher", str(run / "checkpoints" / "gone.ckpt"),
          "--trainer.default_root_dir", str(files / "distill")], "no readable teacher"),
    ]
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
    "kill_random": (drill_kill_random, 20),
    "kill_in_write": (drill_kill_in_write, 10),
    "kill_ddp": (drill_kill_ddp, 2),
    "signals": (drill_signals, 3),
    "concurrent": (drill_concurrent, 2),
    "overwrite": (drill_overwrite, 1),
    "symlinked_last": (drill_symlinked_last, 2),
    "unwritable_out": (drill_unwritable_out, 1),
    "huge_requests": (drill_huge_requests, 1),
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


KILL_DRILLS = ("kill_random", "kill_in_write", "kill_ddp")


def acceptance(rows: list[dict], d: Drill) -> dict:
    """The counts the drill exists for, over all drills run."""
    details = [line.lower() for r in rows for line in r["details"]]
    kill_resumes = [r for r in d.resumes if r["root"].startswith("kill")  # those that interrupted training
                    and (r["from_step"] is None or r["from_step"] < d.steps)]
    return {
        "random_step_kills": sum(r["runs"] for r in rows if r["drill"] in KILL_DRILLS),
        "kills_resumed_exactly": sum(r["exact"] for r in kill_resumes),
        "kills_resumed_mid_epoch": sum(r["mid_epoch"] for r in kill_resumes),
        "kills_resumed_from_steps": sorted({r["from_step"] for r in kill_resumes if r["from_step"] is not None}),
        "signal_stops": next((r["runs"] for r in rows if r["drill"] == "signals"), 0),
        "corrupted_logs_or_checkpoints": sum("corrupt" in x or "more than once" in x for x in details),
        "silent_overwrites": sum("silent overwrite" in x or "written through" in x for x in details),
        "tracebacks": sum("traceback" in x for x in details),
        "exit_0_stops": sum("exit-0 stop" in x for x in details),
        "failures": len(details),
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
        "settings": {"training": f"GSPN-T/2 (width 32, depth 2) on 8x8 digits, batch 8, {BATCHES_PER_EPOCH} batches "
                                 "per epoch, a checkpoint every step",
                     "steps": d.steps, "samples": d.samples, "shard_size": 4},
        "wall_s": round(time.perf_counter() - start, 1),
        "cpu_s": round(sum(u.ru_utime + u.ru_stime for u in usage), 1),
        "note": "shared 2-core machine: wall time is inflated by other users; runs and failures are what count",
        "kills": sum(r["runs"] for r in rows if r["drill"] in KILL_DRILLS),
        "acceptance": acceptance(rows, d),
        "drills": rows,
    }
    path = args.json or REPO / "benchmarks" / "results" / f"fault-drill-{slug(cpu_name())}-{dt.date.today()}.json"
    write_json(path, result)
    print(f"wrote {path} ({result['wall_s']} s wall, {result['cpu_s']} s CPU)")
    return result


if __name__ == "__main__":
    main()
