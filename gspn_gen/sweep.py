"""`python -m gspn_gen.sweep`: sample a checkpoint at several guidance scales, score each scale, plot FID
against the scale and the FID-IS trade-off curve (the figure of the ADM and DiT papers), name the best scale.

    python -m gspn_gen.sweep --ckpt runs/demo/checkpoints/last.ckpt --cfg-scale 1 1.5 2 3 4 \\
        --num-samples 1000 --steps 25 --ref digits:val --extractor digits --out runs/demo/sweep
    python -m gspn_gen.sweep --ckpt runs/x/checkpoints/last.ckpt --cfg-scale 1 1.25 1.5 1.75 2 \\
        --num-samples 10000 --sampler ddpm --steps 250 --ref VIRTUAL_imagenet256_labeled.npz --out sweep/

The checkpoint is loaded once; every scale is one request of the sampling library (gspn_gen.sampling:
the sharded, resumable .npz of sample.py, OUT/cfg-<scale>/samples.npz) with the same seeds (sample i
from the noise of (seed, i)), so the scales differ only in guidance, and is scored by fid_eval
(OUT/cfg-<scale>/metrics.json). Every request is checked against the model before anything is written. Rerunning the same command resumes: scored scales are read
back, a half-sampled one continues from its shards; more scales may be added to the same OUT later.
Writes OUT/sweep.json and OUT/sweep.png and prints the scale with the lowest FID.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from fid_eval.errors import FidEvalError
from fid_eval.evaluation import METRICS, PROTOCOLS, evaluate, parse_metrics, print_warnings, resolve_protocol
from fid_eval.extractors import EXTRACTORS, build_extractor
from gspn_gen.fileio import atomic_write, write_json
from gspn_gen.runlock import LOCK_NAME, LockHeld, RunLock, dir_lock
from gspn_gen.sample_cli import run_command
from gspn_gen.sampling.request import SampleRequest, SamplingError, resolve_device
from gspn_gen.sampling.run import load, sample

MANIFEST = "sweep_settings.json"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gspn_gen.sweep", description=__doc__.split("\n\n")[0],
                                epilog="examples:\n" + __doc__.split("\n\n")[1] + "\n\n" + __doc__.split("\n\n")[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="training checkpoint to sample (EMA weights)")
    p.add_argument("--cfg-scale", "--cfg-scales", dest="cfg_scales", type=float, nargs="+", required=True, metavar="S",
                   help="guidance scales to try, e.g. 1 1.5 2 3 4 (1 = no guidance)")
    p.add_argument("--num-samples", type=int, required=True, help="samples per scale, classes balanced")
    p.add_argument("--ref", required=True, help="reference: ADM .npz, folder, statistics file, or digits:val")
    p.add_argument("--out", type=Path, required=True, help="sweep folder: per-scale samples and metrics, "
                                                           "sweep.json, sweep.png")
    g = p.add_argument_group("sampling (as sample.py)")
    g.add_argument("--steps", type=int, default=None, help="sampling steps (default: the process's own)")
    g.add_argument("--sampler", default=None, help="gaussian: ddim or ddpm; flow: heun, euler or sde")
    g.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="guide only where t / T lies in [LO, HI]")
    g.add_argument("--guide-channels", type=int, default=None, metavar="K",
                   help="guide only the first K latent channels (default: all; 3 reproduces official DiT/SiT)")
    g.add_argument("--seed", type=int, default=0, help="global seed: sample i uses the noise of (seed, i)")
    g.add_argument("--batch-size", type=int, default=64, help="samples per forward pass")
    g.add_argument("--vae", default=None, metavar="ID_OR_DIR", help="local copy of the checkpoint's VAE")
    g = p.add_argument_group("scoring (as python -m fid_eval)")
    g.add_argument("--metrics", default=None,
                   help=f"comma list of {', '.join(METRICS)} (default fid,sfid,isc,prc; no sfid for digits)")
    g.add_argument("--protocol", choices=PROTOCOLS, default=None, help="adm (default for Inception) or torch-fidelity")
    g.add_argument("--extractor", choices=EXTRACTORS, default="inception")
    g.add_argument("--weights", default=None, help="extractor weights file (default: its usual location)")
    g.add_argument("--score-batch-size", type=int, default=64, help="images per extractor forward pass")
    g.add_argument("--cache-dir", type=Path, default=None, help="reference statistics cache")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto, for sampling and scoring (default: "
                                                     "cuda when available)")
    p.add_argument("--delete-samples", action="store_true",
                   help="delete each scale's samples.npz once it is scored (metrics.json stays)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars while scoring")
    p.add_argument("--overwrite", action="store_true",
                   help="OUT holds a sweep with other settings (or other files): replace it instead of refusing")
    return p.parse_args(argv)


def scale_name(scale: float) -> str:
    return f"cfg-{scale:g}"


def check_manifest(out: Path, settings: dict, overwrite: bool = False) -> None:
    """Record the sweep's settings once; a sweep made with other ones (or a folder holding other files)
    is refused, or with `overwrite` its results are removed first."""
    path = out / MANIFEST
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = {}
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if not diff:
            return
        if not overwrite:
            raise FidEvalError(f"{out} holds a sweep made with other settings {diff} (old, new): use another "
                               "--out, or pass --overwrite to replace it")
    elif any(p.name != LOCK_NAME for p in out.iterdir()) and not overwrite:
        raise FidEvalError(f"--out {out} holds files but no sweep ({MANIFEST}): use another --out, or pass "
                           "--overwrite to write the sweep there")
    for name in (MANIFEST, "sweep.json", "sweep.png"):
        (out / name).unlink(missing_ok=True)
    for folder in out.glob("cfg-*"):  # the results of the other settings
        for name in ("metrics.json", "samples.npz"):
            (folder / name).unlink(missing_ok=True)
    write_json(path, settings)


def scale_request(args: argparse.Namespace, scale: float, path: Path | None = None) -> SampleRequest:
    """The sampling request of one scale (OUT/cfg-<scale>/samples.npz)."""
    return SampleRequest(ckpt=args.ckpt, out=None if path is None else str(path), num_samples=args.num_samples,
                         cfg_scale=scale, guidance_interval=None if args.guidance_interval is None else
                         tuple(args.guidance_interval), guide_channels=args.guide_channels, sampler=args.sampler,
                         steps=args.steps, seed=args.seed, batch_size=args.batch_size, device=args.device,
                         vae=args.vae, overwrite=args.overwrite)  # overwrite: shards left by other settings


def best_row(rows: list[dict]) -> dict | None:
    """The row with the lowest FID (None when FID was not computed)."""
    scored = [r for r in rows if "fid" in r]
    return min(scored, key=lambda r: r["fid"]) if scored else None


def plot(rows: list[dict], best: dict | None, path: Path, title: str) -> None:
    """FID vs guidance scale, and FID vs IS (and precision vs recall) along the scales, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["cfg_scale"])
    scales = [r["cfg_scale"] for r in rows]
    panels = [p for p in ("fid", "isc_mean", "precision") if all(p in r for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.0), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "fid":
            ax.plot(scales, [r["fid"] for r in rows], "o-", color="tab:blue")
            if best is not None:
                ax.plot([best["cfg_scale"]], [best["fid"]], "*", color="tab:red", markersize=16,
                        label=f"best: cfg {best['cfg_scale']:g}, FID {best['fid']:.3g}")
                ax.legend()
            ax.set(xlabel="guidance scale", ylabel="FID (lower is better)", title="FID vs guidance scale")
        else:
            x_key, y_key, x_label, y_label, name = (
                ("isc_mean", "fid", "Inception Score", "FID", "FID vs IS trade-off") if panel == "isc_mean" else
                ("recall", "precision", "recall", "precision", "precision vs recall"))
            xs, ys = [r[x_key] for r in rows], [r[y_key] for r in rows]
            ax.plot(xs, ys, "o-", color="tab:green" if panel == "isc_mean" else "tab:purple")
            for x, y, s in zip(xs, ys, scales):
                ax.annotate(f"{s:g}", (x, y), textcoords="offset points", xytext=(5, 5), fontsize=9)
            ax.set(xlabel=x_label, ylabel=y_label, title=f"{name} (labels: scale)")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def format_rows(rows: list[dict], best: dict | None) -> str:
    columns = [("cfg_scale", "cfg", "{:g}"), ("fid", "FID", "{:.4f}"), ("sfid", "sFID", "{:.4f}"),
               ("isc_mean", "IS", "{:.3f}"), ("precision", "precision", "{:.4f}"), ("recall", "recall", "{:.4f}"),
               ("class_agreement", "class agr.", "{:.4f}")]
    columns = [c for c in columns if any(c[0] in r for r in rows)]
    lines = ["  ".join(f"{title:>10}" for _, title, _ in columns)]
    for r in sorted(rows, key=lambda r: r["cfg_scale"]):
        mark = "  <- best FID" if best is not None and r is best else ""
        lines.append("  ".join(f"{fmt.format(r[k]) if k in r else '-':>10}" for k, _, fmt in columns) + mark)
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    """The sweep of `args` (parse_args); FidEvalError or SamplingError for anything it refuses."""
    if args.score_batch_size < 1:
        raise FidEvalError(f"--score-batch-size must be >= 1, got {args.score_batch_size}")
    requests = [scale_request(args, scale) for scale in args.cfg_scales]  # every value checked, once, there
    # checked against the model before the settings are recorded, so a corrected rerun may follow
    module = load(requests[0], resolve_device(args.device))
    for request in requests[1:]:
        request.check(module)
    scales = list(dict.fromkeys(args.cfg_scales))  # in order, without repeats
    metrics = parse_metrics(args.metrics or [m for m in METRICS if m != "kid" and
                                             (m != "sfid" or args.extractor == "inception")])
    protocol = resolve_protocol(args.protocol, args.extractor)
    stat = os.stat(args.ckpt)
    settings = {"ckpt": os.path.abspath(args.ckpt), "ckpt_size": stat.st_size, "ckpt_mtime_ns": stat.st_mtime_ns,
                "num_samples": args.num_samples, "steps": args.steps, "sampler": args.sampler,
                "guidance_interval": args.guidance_interval,
                "guide_channels": args.guide_channels, "seed": args.seed, "ref": args.ref,
                "metrics": metrics, "protocol": protocol, "extractor": args.extractor, "weights": args.weights}
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FidEvalError(f"--out {args.out}: cannot create it ({e.strerror or e})") from None
    try:
        with RunLock(dir_lock(args.out), f"--out {str(args.out)!r}"):  # one sweep per folder
            return _sweep(args, module, settings, scales, metrics, protocol)
    except LockHeld as e:
        raise FidEvalError(f"{e}: wait for that sweep to end, or use another --out") from None


def _sweep(args: argparse.Namespace, module, settings: dict, scales: list[float], metrics: list[str],
           protocol: str) -> dict:
    check_manifest(args.out, settings, args.overwrite)

    extractor, rows = None, []
    for scale in scales:
        folder = args.out / scale_name(scale)
        metrics_path, samples_path = folder / "metrics.json", folder / "samples.npz"
        if metrics_path.exists():
            report = json.loads(metrics_path.read_text())
            print(f"cfg {scale:g}: scored before ({metrics_path})", file=sys.stderr)
        else:
            if not samples_path.exists():
                print(f"cfg {scale:g}: sampling {args.num_samples} images", file=sys.stderr)
                sample(scale_request(args, scale, samples_path), module)
            if extractor is None:
                extractor = build_extractor(args.extractor, args.weights, str(next(module.parameters()).device))
            report = evaluate(str(samples_path), args.ref, metrics, extractor, batch_size=args.score_batch_size,
                              cache_dir=args.cache_dir, protocol=protocol, progress=not args.no_progress)
            report["cfg_scale"] = scale
            print_warnings(report)
            write_json(metrics_path, report)
            if args.delete_samples:
                samples_path.unlink()
        rows.append({"cfg_scale": scale, **report["metrics"]})
        last = report

    best = best_row(rows)
    summary = {
        "ckpt": settings["ckpt"], "settings": settings, "protocol": protocol, "extractor": last["extractor"],
        "ref": last["ref"], "scales": sorted(rows, key=lambda r: r["cfg_scale"]),
        "best": None if best is None else {"cfg_scale": best["cfg_scale"], "fid": best["fid"]},
    }
    write_json(args.out / "sweep.json", summary)
    title = (f"{Path(args.ckpt).name}: {args.num_samples} samples per scale, {last['extractor']['name']} features, "
             f"protocol {protocol}")
    plot(rows, best, args.out / "sweep.png", title)
    print(format_rows(rows, best))
    print(f"wrote {args.out / 'sweep.json'} and {args.out / 'sweep.png'}")
    if best is not None:
        print(f"best guidance scale for FID: {best['cfg_scale']:g} (FID {best['fid']:.4f})")
    return summary


def main(argv: list[str] | None = None) -> int:
    """`python -m gspn_gen.sweep ...`: 0, or 2 with one `error:` line."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return run_command(lambda: run(args), (FidEvalError, SamplingError), resumable=True)


if __name__ == "__main__":
    raise SystemExit(main())
