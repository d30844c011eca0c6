"""Distilled vs from-scratch GSPN-T/4 on the embedded digits (CPU): steps, wall and CPU time, quality.

    python benchmarks/distill_digits.py [--out runs/distill_digits] [--json PATH] [--skip PHASE ...]
                                        [--score-steps 250 500 1000 2000]

Runs, one after another, each with `nice -n 10` (the machine may be shared):
  teacher       DiT-T/4, the demo recipe (demo_digits.yaml --model.model DiT-T/4), 2,000 steps
  distill       GSPN-T/4 started from the teacher (distill_dit-t4_to_gspn-t4_digits.yaml), 1,000 steps of
                output matching
  distill+ft    the same, 250 steps of output matching then 750 of the ordinary diffusion loss
  scratch-half  GSPN-T/4, the demo recipe cut to 1,000 steps (its own cosine schedule): equal steps
  scratch       GSPN-T/4, the demo recipe (demo_digits.yaml), 2,000 steps
The checkpoints at steps 500, 1,000 and 2,000 (--score-steps; the teacher: its last) are scored with
1,000 samples (25 DDIM steps, cfg 4) drawn by the sampling library (as `sample.py` draws them), then
fid_eval against digits:val with the digits extractor (class agreement, FID, IS, precision/recall).
Every run also logs make demo's FID-during-training curve (FIDCallback: 200 EMA samples, 10 DDIM steps,
cfg 2, every 250 steps) to its metrics.csv; `benchmarks/training_curves.py` plots those.
Wall time (perf_counter) and CPU time (user + system of the child processes, getrusage) are recorded
per training run, less the FIDCallback's own time (recorded beside it); on a shared machine wall time is inflated and CPU time is the steadier number.
Each finished phase is kept (OUT/<phase>/done.json), so an interrupted run resumes where it stopped.
Prints a table and writes JSON naming the machine (default benchmarks/results/distill-digits-<cpu>-<date>.json),
with the first step at which each run reaches the from-scratch run's final class agreement, and beside it
a PNG of class agreement and FID against the step (and one of the FIDCallback curves, -fid-callback.png).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

import fid_eval
from gspn_gen.fileio import write_json
from gspn_gen.report import cpu_name, plot_curves, read_evals, slug
from gspn_gen.sampling.request import SampleRequest
from gspn_gen.sampling.run import sample

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DEMO = "configs/experiments/demo_digits.yaml"
DISTILL = "configs/experiments/distill_dit-t4_to_gspn-t4_digits.yaml"
SCORED_STEPS = (500, 1000, 2000)
EVERY_250 = """trainer:
  enable_progress_bar: false
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
        filename: "{step:04d}"
        save_top_k: -1
        save_last: true
        every_n_train_steps: 250
    - class_path: gspn_gen.fid_callback.FIDCallback
      init_args: {every_n_steps: 250, num_samples: 200, ref: "digits:val", extractor: digits, cfg_scale: 2.0,
                  steps: 10, batch_size: 200}
"""


def timed(cmd: list[str], log: Path) -> dict:
    """Run `nice -n 10 cmd` (output to `log`); wall seconds and the child processes' CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(["nice", "-n", "10", *cmd], cwd=REPO, stdout=f, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        sys.exit(f"error: {' '.join(cmd[:4])} ... failed (exit {proc.returncode}); see {log}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}


def train(phase: str, out: Path, args: list[str]) -> dict:
    """One training run into out/phase (skipped when already done); returns its timing."""
    root = out / phase
    done = root / "done.json"
    if done.exists():
        return json.loads(done.read_text())
    root.mkdir(parents=True, exist_ok=True)
    overlay = out / "every250.yaml"
    overlay.write_text(EVERY_250)
    # --ckpt_path last: a phase cut short continues where it stopped (exactly), a new one starts from scratch
    cmd = [*args, "--config", str(overlay), "--trainer.default_root_dir", str(root), "--ckpt_path", "last"]
    print(f"[{phase}] training ...", flush=True)
    took = timed(cmd, root / "train.log")
    evals = read_evals(root)  # the FIDCallback's share is reported apart from the training time
    ev_wall, ev_cpu = (round(sum(r.get(k, 0.0) for r in evals), 1) for k in ("seconds", "cpu_seconds"))
    result = {"command": " ".join(cmd), "wall_s": round(took["wall_s"] - ev_wall, 1),
              "cpu_s": round(took["cpu_s"] - ev_cpu, 1), "fid_callback_wall_s": ev_wall, "fid_callback_cpu_s": ev_cpu}
    write_json(done, result)
    return result


def evaluate(ckpt: Path) -> dict:
    """Class agreement, FID, IS, ... of 1,000 samples of a checkpoint (cached beside it)."""
    metrics = ckpt.with_suffix(".metrics.json")
    if not metrics.exists():
        npz = ckpt.with_suffix(".samples.npz")
        print(f"  scoring {ckpt.relative_to(REPO) if ckpt.is_relative_to(REPO) else ckpt} ...", flush=True)
        sample(SampleRequest(ckpt=str(ckpt), num_samples=1000, cfg_scale=4.0, steps=25, out=str(npz),
                             overwrite=True), verbose=False)  # overwrite: a cut-short run's samples are redrawn
        write_json(metrics, fid_eval.evaluate(str(npz), "digits:val", None, "digits", device="cpu", progress=False))
        npz.unlink()
    return json.loads(metrics.read_text())


def scores(root: Path, steps: tuple[int, ...]) -> dict[int, dict]:
    """Step -> metrics of the run's checkpoints at `steps` (its last checkpoint when it has no step files)."""
    ckpts = {int(c.stem.split("=")[1]): c for c in (root / "checkpoints").glob("step=*.ckpt")}
    if not ckpts:
        last = root / "checkpoints" / "last.ckpt"
        ckpts = {int(torch.load(last, map_location="cpu", weights_only=True)["global_step"]): last}
    out = {}
    for step in sorted(s for s in ckpts if s in steps or len(ckpts) == 1):
        m = evaluate(ckpts[step])["metrics"]
        out[step] = {k: m[k] for k in ("class_agreement", "fid", "isc_mean", "precision", "recall") if k in m}
    return out


def reaches_scratch(runs: dict) -> dict[str, int | None]:
    """Per run: the first scored step whose class agreement is at least the scratch run's final one."""
    if not runs.get("scratch", {}).get("scores"):
        return {}
    final = runs["scratch"]["scores"][max(runs["scratch"]["scores"])]["class_agreement"]
    return {phase: next((s for s, m in sorted(run["scores"].items()) if m["class_agreement"] >= final), None)
            for phase, run in runs.items() if phase != "scratch"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", default="runs/distill_digits", help="run folder (default runs/distill_digits)")
    p.add_argument("--json", default=None, help="result file (default benchmarks/results/distill-digits-<cpu>-<date>.json)")
    p.add_argument("--skip", nargs="+", default=[], metavar="PHASE",
                   help="phases not to run, e.g. scratch (the demo's own numbers are in the README)")
    p.add_argument("--score-steps", type=int, nargs="+", default=list(SCORED_STEPS), metavar="STEP",
                   help="checkpoints to score (every 250 steps are kept; default 500 1000 2000)")
    args = p.parse_args()
    out = (REPO / args.out).resolve()
    py = sys.executable
    teacher_ckpt = out / "teacher" / "checkpoints" / "last.ckpt"
    distill = [py, "train_gen.py", "fit", "--config", DISTILL, "--model.distill.teacher", str(teacher_ckpt)]
    phases = {
        "teacher": [py, "train_gen.py", "fit", "--config", DEMO, "--model.model", "DiT-T/4"],
        "distill": [*distill, "--model.distill.distill_steps", "null"],
        "distill+ft": [*distill, "--model.distill.distill_steps", "250"],
        "scratch-half": [py, "train_gen.py", "fit", "--config", DEMO, "--trainer.max_steps", "1000"],
        "scratch": [py, "train_gen.py", "fit", "--config", DEMO],
    }
    unknown = sorted(set(args.skip) - set(phases) | ({"teacher"} & set(args.skip)))
    if unknown:
        sys.exit(f"error: --skip {unknown}: expected phases among {list(phases)[1:]} (the teacher is needed)")
    for phase in args.skip:
        del phases[phase]
    date = _dt.date.today().isoformat()
    path = Path(args.json) if args.json else RESULTS / f"distill-digits-{slug(cpu_name())}-{date}.json"
    runs = {}
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    for phase, cmd in phases.items():
        runs[phase] = train(phase, out, cmd)
        # the teacher is scored at its last step only
        runs[phase]["scores"] = scores(out / phase, (2000,) if phase == "teacher" else tuple(args.score_steps))
        runs[phase]["fid_callback"] = read_evals(out / phase)
        write_json(path, {  # after every phase, so a run cut short keeps what it measured
            "what": "distilled (from DiT-T/4) vs from-scratch GSPN-T/4 on the embedded digits",
            "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "load_avg_at_start": load_at_start,
                        "load_avg_now": [round(x, 2) for x in os.getloadavg()],
                        "threads": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
                                    if k in os.environ},
                        "note": "shared machine: wall times inflated by other users' jobs; CPU times are steadier"},
            "date": date,
            "eval": "1,000 samples, 25 DDIM steps, cfg 4; fid_eval --ref digits:val --extractor digits",
            "runs": runs,
            "reaches_scratch": reaches_scratch(runs),
        })
    plot_curves({phase: [{"step": step, **m} for step, m in run["scores"].items()] for phase, run in runs.items()},
         path.with_suffix(".png"), f"GSPN-T/4 on digits: distilled from DiT-T/4 vs from scratch ({date}); "
                                   "1,000 samples, 25 DDIM steps, cfg 4")
    curves = path.with_name(f"{path.stem}-fid-callback.png")
    plot_curves({phase: run["fid_callback"] for phase, run in runs.items()}, curves,
         "the same runs, FIDCallback as in make demo: 200 EMA samples, 10 DDIM steps, cfg 2")

    print(f"\n{'run':<13} {'step':>5} {'class agr.':>10} {'FID':>7}   (training: wall / CPU)")
    for phase, run in runs.items():
        for step, m in run["scores"].items():
            print(f"{phase:<13} {step:>5} {m['class_agreement'] * 100:>9.1f}% {m['fid']:>7.2f}")
        print(f"{'':<13} {'':>5} {'':>10} {'':>7}   {run['wall_s'] / 60:.1f} min / {run['cpu_s'] / 60:.1f} min")
    for phase, step in reaches_scratch(runs).items():
        print(f"{phase} reaches the scratch run's final class agreement " +
              (f"at step {step}" if step is not None else "at none of its scored steps"))
    print(f"wrote {path}, {path.with_suffix('.png')} and {curves}")


if __name__ == "__main__":
    main()
