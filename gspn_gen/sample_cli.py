"""`python sample.py`: class grids and large sample batches from a training checkpoint.

The command line of the sampling library: its options become one `SampleRequest` (where every value is
validated), which `gspn_gen.sampling.run.sample` runs. Any refusal is one `error:` line and exit status 2,
with nothing written; a signal stops the run (a .npz continues from its shards with the same command).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from gspn_gen.sampling.request import MAX_CFG_SCALE, SampleRequest, SamplingError
from gspn_gen.sampling.run import sample
from gspn_gen.stopping import Interrupted, exit_on_signals

EPILOG = """examples:
  python sample.py --ckpt runs/demo/checkpoints/last.ckpt --classes 0 1 2 3 --per-class 8 --out grid.png
  python sample.py --ckpt runs/x/checkpoints/last.ckpt --classes 207 360 387 974 --cfg-scale 4 --out grid.png
  python sample.py --ckpt runs/x/checkpoints/last.ckpt --num-samples 50000 --cfg-scale 1.5 --out samples.npz

Sample i always uses the noise of (seed, i), so results do not depend on --batch-size or --devices.
Multi-GPU: python sample.py --ckpt ... --num-samples 50000 --devices 8 --out samples.npz
For FID, DiT and SiT report cfg-scale 1.5 (and 1.0 for unguided); grids usually look best at 4.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sample.py", description=__doc__.splitlines()[0].split(": ", 1)[1],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="Lightning checkpoint written by train_gen.py (e.g. runs/demo/checkpoints/last.ckpt)")
    p.add_argument("--out", required=True,
                   help="output: a .png/.jpg/.jpeg writes a labelled class grid in that format, a .npz an ADM-style "
                        "batch (arr_0 uint8 NHWC, arr_1 int64 labels); extensions in any case")
    p.add_argument("--classes", type=int, nargs="+", default=None,
                   help="class ids for the grid, one row each (default: all classes, at most 16)")
    p.add_argument("--per-class", type=int, default=8, help="grid: images per class row (default 8)")
    p.add_argument("--num-samples", type=int, default=None,
                   help=".npz: number of samples, classes balanced (sample i has class i mod num_classes)")
    p.add_argument("--cfg-scale", type=float, default=4.0,
                   help=f"classifier-free guidance scale, 0 to {MAX_CFG_SCALE:g}; 1 disables guidance, "
                        "0 samples unconditionally (default 4.0)")
    p.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="guide only where t / T lies in [LO, HI], 0 <= LO <= HI <= 1 (default: everywhere)")
    p.add_argument("--guide-channels", type=int, default=None, metavar="K",
                   help="guide only the first K latent channels (default: all); official DiT/SiT sampling "
                        "guides 3 of the SD VAE's 4, so --guide-channels 3 reproduces their published numbers")
    p.add_argument("--sampler", default=None,
                   help="gaussian: ddim (default) or ddpm; flow: heun (default), euler or sde")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: the process's own: gaussian 50 DDIM steps, flow 25 Heun steps)")
    p.add_argument("--seed", type=int, default=0, help="global seed; sample i's noise depends only on (seed, i)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per forward pass (default 64)")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:N or auto (default: cuda when available); .npz runs with one device too")
    p.add_argument("--no-ema", action="store_true", help="use the raw training weights instead of the EMA")
    p.add_argument("--vae", default=None, metavar="ID_OR_DIR",
                   help="load the checkpoint's VAE from here instead (e.g. a local copy on an offline machine)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out (and discard OUT.parts/ shards drawn with other settings); "
                        "without it an existing output is refused, except a .npz run resuming its own shards")
    p.add_argument("--shard-size", type=int, default=1000,
                   help=".npz: samples per resumable shard in OUT.parts/ (default 1000); a crashed run resumes "
                        "with the same command, skipping finished shards; a replaced checkpoint or other settings "
                        "are refused")
    p.add_argument("--devices", type=int, default=1,
                   help=".npz: processes/GPUs on this node (Lightning Fabric, DDP); shards are split across ranks")
    p.add_argument("--num-nodes", type=int, default=1, help=".npz: number of nodes (SLURM/torchrun launch)")
    p.add_argument("--accelerator", default="auto", help=".npz with --devices: cpu, gpu or auto")
    return p.parse_args(argv)


def request(args: argparse.Namespace) -> SampleRequest:
    """The command line as a SampleRequest (SamplingError: a value it refuses)."""
    return SampleRequest(
        ckpt=args.ckpt, out=args.out, classes=None if args.classes is None else tuple(args.classes),
        per_class=args.per_class, num_samples=args.num_samples, cfg_scale=args.cfg_scale,
        guidance_interval=None if args.guidance_interval is None else tuple(args.guidance_interval),
        guide_channels=args.guide_channels, sampler=args.sampler, steps=args.steps, seed=args.seed,
        batch_size=args.batch_size, device=args.device, use_ema=not args.no_ema, vae=args.vae,
        overwrite=args.overwrite, shard_size=args.shard_size, devices=args.devices, num_nodes=args.num_nodes,
        accelerator=args.accelerator)


def run_command(work: Callable[[], object], errors: tuple[type[Exception], ...], resumable: bool) -> int:
    """Run `work()` as a command: a signal stops it (Interrupted, after an `info:` line), an error of `errors`
    is one `error:` line and status 2; else 0. `resumable`: the same command continues what was drawn."""
    try:
        with exit_on_signals():
            work()
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"info: {e}" + (" (the same command continues from the shards drawn so far)" if resumable else ""),
              file=sys.stderr)
        raise
    return 0


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    code = run_command(lambda: sample(request(args)), (SamplingError,), args.out.lower().endswith(".npz"))
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
