"""FID and class agreement against the training step, from the `eval/*` rows that FIDCallback logs.

    python benchmarks/training_curves.py runs/demo --out benchmarks/results/demo-curve.png
    python benchmarks/training_curves.py distilled=runs/d/distill scratch=runs/d/scratch --out curves.png \
        --json curves.json
    /usr/bin/time -v -o demo.time make demo
    python benchmarks/training_curves.py runs/demo --out demo.png --json demo.json --time demo.time \
        --final runs/demo/metrics.json --fit-cpu-seconds 1234

Each RUN is a training folder holding `metrics.csv` (default_root_dir), optionally named LABEL=DIR. Prints
a table step -> FID, class agreement per run and the evaluations' cost: the sum of `eval/seconds` and
`eval/cpu_seconds` against the run's wall time (first to last write of its folder: config.yaml to
checkpoints/last.ckpt) and, given --fit-cpu-seconds (the training process's CPU time), its CPU time.
Writes the PNG (FID and class agreement vs step, one line per run) and, with --json, the same numbers as
JSON, with the machine, its load, and optionally a `/usr/bin/time -v` report (--time) and the final
fid_eval report (--final) of the command that made the run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from gspn_gen.fileio import write_json
from gspn_gen.report import machine, plot_curves, read_evals


def run_wall_seconds(run: Path) -> float | None:
    """Seconds from the start of fit (config.yaml written) to its last checkpoint; None when either is missing."""
    start, end = run / "config.yaml", run / "checkpoints" / "last.ckpt"
    if not (start.exists() and end.exists()):
        return None
    return end.stat().st_mtime - start.stat().st_mtime


def summarize(run: Path) -> dict:
    evals = read_evals(run)
    wall = run_wall_seconds(run)
    eval_s = sum(r.get("seconds", 0.0) for r in evals)
    out = {"run": str(run), "evals": evals, "eval_seconds": round(eval_s, 1),
           "eval_cpu_seconds": round(sum(r.get("cpu_seconds", 0.0) for r in evals), 1)}
    if wall is not None:
        out.update(fit_wall_seconds=round(wall, 1), train_wall_seconds=round(wall - eval_s, 1),
                   eval_fraction_of_training=round(eval_s / (wall - eval_s), 4))
    return out


def time_report(path: Path) -> dict:
    """Wall and CPU seconds and peak memory from a `/usr/bin/time -v` report."""
    fields = dict(line.strip().rsplit(": ", 1) for line in path.read_text().splitlines() if ": " in line)
    h_m_s = [float(x) for x in fields["Elapsed (wall clock) time (h:mm:ss or m:ss)"].split(":")]
    wall = sum(v * 60 ** i for i, v in enumerate(reversed(h_m_s)))
    return {"command": fields.get("Command being timed", "").strip('"'), "wall_s": round(wall, 1),
            "cpu_s": round(float(fields["User time (seconds)"]) + float(fields["System time (seconds)"]), 1),
            "max_rss_mb": round(int(fields["Maximum resident set size (kbytes)"]) / 1024),
            "exit_status": int(fields["Exit status"])}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="[LABEL=]DIR", help="training folders holding metrics.csv")
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    p.add_argument("--title", default="FID during training (FIDCallback)")
    p.add_argument("--time", type=Path, default=None, help="`/usr/bin/time -v` report of the command (for --json)")
    p.add_argument("--final", type=Path, default=None, help="fid_eval --out report of the final samples (for --json)")
    p.add_argument("--note", default=None, help="how the runs were made (environment, load), kept in --json")
    p.add_argument("--fit-cpu-seconds", type=float, default=None,
                   help="CPU seconds of the (single) training process, for the evaluations' CPU share")
    args = p.parse_args(argv)
    if args.fit_cpu_seconds is not None and len(args.runs) != 1:
        sys.exit("error: --fit-cpu-seconds needs exactly one run")
    runs = {}
    for spec in args.runs:
        label, _, folder = spec.rpartition("=")
        folder = Path(folder)
        if not (folder / "metrics.csv").exists():
            sys.exit(f"error: {folder}: no metrics.csv (expected a training folder, default_root_dir)")
        runs[label or folder.name] = summarize(folder)
        if args.fit_cpu_seconds is not None:
            s = runs[label or folder.name]
            s.update(fit_cpu_seconds=args.fit_cpu_seconds, eval_cpu_fraction_of_training=round(
                s["eval_cpu_seconds"] / (args.fit_cpu_seconds - s["eval_cpu_seconds"]), 4))
    for label, s in runs.items():
        print(f"{label}: {len(s['evals'])} evaluations, {s['eval_seconds']} s wall / {s['eval_cpu_seconds']} s CPU"
              + (f"; fit {s['fit_wall_seconds']} s wall, evaluations = {s['eval_fraction_of_training']:.1%} of "
                 f"the training wall time" if "fit_wall_seconds" in s else "")
              + (f", {s['eval_cpu_fraction_of_training']:.1%} of its CPU time" if "fit_cpu_seconds" in s else ""))
        for r in s["evals"]:
            print(f"  step {r['step']:>6}  FID {r['fid']:8.3f}" +
                  (f"  class agreement {r['class_agreement']:.3f}" if "class_agreement" in r else ""))
    plot_curves({label: s["evals"] for label, s in runs.items()}, args.out, args.title)
    print(f"wrote {args.out}")
    if args.json is not None:
        result = {"machine": machine(load_avg_at_end=[round(x, 2) for x in os.getloadavg()]), **({"note": args.note} if args.note else {}), "runs": runs}
        if args.time is not None:
            result["time"] = time_report(args.time)
        if args.final is not None:
            final = json.loads(args.final.read_text())
            result["final"] = {k: final[k] for k in ("metrics", "samples", "ref", "settings") if k in final}
        write_json(args.json, result)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
