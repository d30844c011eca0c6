"""Command line: score samples against a reference, or precompute a reference's statistics.

    python -m fid_eval --samples samples.npz --ref VIRTUAL_imagenet256_labeled.npz --metrics fid,isc,prc
    python -m fid_eval --samples runs/demo/samples.npz --ref digits:val --extractor digits --out metrics.json
    python -m fid_eval stats --input VIRTUAL_imagenet256_labeled.npz --out ref_stats.npz

Inputs: an image folder, an ADM-style .npz (arr_0 uint8 NHWC), a statistics .npz/.pt, or digits:train|val.
Any bad input, missing weights file or mismatch is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fid_eval.errors import FidEvalError
from fid_eval.extractors import EXTRACTORS
from gspn_gen.fileio import write_json


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--extractor", choices=EXTRACTORS, default="inception",
                        help="feature network (default inception: torch-fidelity inception-v3-compat)")
    parser.add_argument("--weights", default=None,
                        help="extractor weights file (inception default: "
                             "$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth; "
                             "digits default: fid_eval/weights/digits_cnn.pt)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--workers", type=int, default=None, help="image decoding threads for folders")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fid_eval",
                                description="Score generated images against a reference: FID, IS, KID, "
                                            "precision/recall (features -> cached statistics -> metrics).",
                                epilog="examples:\n" + __doc__.split("\n\n")[1] + "\n\n" + __doc__.split("\n\n")[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", required=True, help="generated images: folder, .npz, or statistics file")
    p.add_argument("--ref", default=None, help="reference: folder, ADM .npz, statistics file, or digits:val")
    p.add_argument("--metrics", default="fid,isc,kid,prc", help="comma list of fid, isc, kid, prc")
    _common(p)
    p.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    p.add_argument("--num-samples", type=int, default=None, help="score only the first N samples")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="reference statistics cache (default $GSPN_FID_CACHE or ~/.cache/gspn_gen/fid_stats)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the statistics cache")
    p.add_argument("--isc-splits", type=int, default=10)
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--kid-subset-size", type=int, default=1000, help="shrinks to the smaller image count")
    p.add_argument("--prc-k", type=int, default=3, help="k of the k-NN balls of precision/recall")
    return p


def _stats_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fid_eval stats",
                                description="Featurise images once and save their statistics "
                                            "(mu, sigma, features, logits) for later --samples/--ref use.")
    p.add_argument("--input", required=True, help="folder, ADM .npz, or digits:train|val")
    p.add_argument("--out", type=Path, required=True, help="statistics file to write (.npz or .pt)")
    _common(p)
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="the statistics cache this reads and fills as well as writing --out "
                        "(default $GSPN_FID_CACHE or ~/.cache/gspn_gen/fid_stats)")
    return p


def _run_stats(args: argparse.Namespace) -> None:
    from fid_eval.extractors import build_extractor
    from fid_eval.inputs import open_images
    from fid_eval.stats import cached_stats, save_stats

    source = open_images(args.input, args.workers)
    extractor = build_extractor(args.extractor, args.weights, args.device)
    stats = cached_stats(source, extractor, args.cache_dir, args.batch_size, not args.no_progress)
    save_stats(stats, args.out)
    print(f"wrote {args.out}: {stats.num_images} images, {stats.mu.shape[0]}-d {extractor.fingerprint} statistics")


def _run_eval(args: argparse.Namespace) -> None:
    from fid_eval.evaluation import evaluate, format_table

    report = evaluate(args.samples, args.ref, args.metrics, args.extractor, args.weights, args.batch_size,
                      args.device, args.cache_dir, not args.no_cache, args.num_samples, args.isc_splits,
                      args.kid_subsets, args.kid_subset_size, args.prc_k, workers=args.workers,
                      progress=not args.no_progress)
    print(format_table(report))
    if args.out is not None:
        write_json(args.out, report)
        print(f"wrote {args.out}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["stats"]:
        args, run = _stats_parser().parse_args(argv[1:]), _run_stats
    else:
        args, run = _eval_parser().parse_args(argv), _run_eval
    if args.batch_size < 1:
        print(f"fid_eval: error: --batch-size must be >= 1, got {args.batch_size}", file=sys.stderr)
        return 2
    try:
        run(args)
    except FidEvalError as e:
        print(f"fid_eval: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
