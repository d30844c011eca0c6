"""Command line: score samples against a reference, or precompute statistics.

    python -m fid_eval --samples samples.npz --ref VIRTUAL_imagenet256_labeled.npz --metrics fid,sfid,isc,prc
    python -m fid_eval --samples runs/demo/samples.npz --ref digits:val --extractor digits --out metrics.json
    python -m fid_eval --samples samples_stats.npz --ref VIRTUAL_imagenet256_labeled.npz --metrics fid,sfid
    python -m fid_eval stats --input VIRTUAL_imagenet256_labeled.npz --out ref_stats.npz

Inputs: an image folder, an ADM-style .npz (arr_0 uint8 NHWC), a statistics .npz/.pt, or digits:train|val.
Two statistics files need no network: FID and sFID are computed from them alone.
Protocols: adm (default for Inception: ADM's evaluator, as DiT/SiT/GSPN report) or torch-fidelity.
Any bad input, missing weights file or mismatch is one line on stderr and exit code 2.
The guidance sweep samples a checkpoint, so it belongs to the generator: `python -m gspn_gen.sweep`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fid_eval.errors import FidEvalError
from fid_eval.evaluation import METRICS, PROTOCOLS
from fid_eval.extractors import EXTRACTORS
from fid_eval.fileio import OutputError, check_output, write_json


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--extractor", choices=EXTRACTORS, default=None,
                        help="feature network (default inception: torch-fidelity inception-v3-compat; with two "
                             "statistics files, the network their records name)")
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
                                description="Score generated images against a reference: FID, sFID, IS, KID, "
                                            "precision/recall (features -> cached statistics -> metrics). "
                                            "Subcommand: `stats` (save statistics). The guidance sweep: "
                                            "python -m gspn_gen.sweep.",
                                epilog="examples:\n" + "\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", required=True, help="generated images: folder, .npz, or statistics file")
    p.add_argument("--ref", default=None, help="reference: folder, ADM .npz, statistics file, or digits:val")
    p.add_argument("--metrics", default=None,
                   help=f"comma list of {', '.join(METRICS)} (default: all; sfid only with Inception)")
    p.add_argument("--protocol", choices=PROTOCOLS, default=None,
                   help="adm: ADM's evaluator (IS over consecutive splits of 5,000, P/R k=3 against the "
                        "reference images, FID/sFID against the batch's stored statistics); torch-fidelity: "
                        "IS over 10 shuffled splits. Default: adm for Inception, torch-fidelity otherwise")
    _common(p)
    p.add_argument("--out", type=Path, default=None, help="write the report as JSON here (refused if it exists)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--num-samples", type=int, default=None, help="score only the first N samples")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="reference statistics cache (default $GSPN_FID_CACHE or ~/.cache/gspn_gen/fid_stats)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the statistics cache")
    p.add_argument("--isc-splits", type=int, default=None, help="torch-fidelity protocol: IS splits (default 10)")
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--kid-subset-size", type=int, default=1000, help="shrinks to the smaller image count")
    p.add_argument("--prc-k", type=int, default=3,
                   help="k of the k-NN balls of precision/recall (ADM protocol: 3 only)")
    return p


def _stats_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fid_eval stats",
                                description="Featurise images once and save their statistics "
                                            "(mu, sigma, mu_s, sigma_s, features, logits) for later --samples/--ref use.")
    p.add_argument("--input", required=True, help="folder, ADM .npz, or digits:train|val")
    p.add_argument("--out", type=Path, required=True, help="statistics file to write (.npz or .pt; refused if it "
                                                           "exists)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
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
    extractor = build_extractor(args.extractor or "inception", args.weights, args.device)
    stats = cached_stats(source, extractor, args.cache_dir, args.batch_size, not args.no_progress)
    save_stats(stats, args.out)
    print(f"wrote {args.out}: {stats.num_images} images, {stats.mu.shape[0]}-d {extractor.fingerprint} statistics")


def _run_eval(args: argparse.Namespace) -> None:
    from fid_eval.evaluation import evaluate, format_table, print_warnings

    report = evaluate(args.samples, args.ref, args.metrics, args.extractor, args.weights, args.batch_size,
                      args.device, args.cache_dir, not args.no_cache, args.num_samples, args.isc_splits,
                      args.kid_subsets, args.kid_subset_size, args.prc_k, workers=args.workers,
                      progress=not args.no_progress, protocol=args.protocol)
    print(format_table(report))
    print_warnings(report)
    if args.out is not None:
        write_json(args.out, report)
        print(f"wrote {args.out}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["sweep"]:  # the sweep samples a checkpoint: it lives with the generator
        print("fid_eval: error: the guidance sweep is `python -m gspn_gen.sweep` (sampling options as sample.py's, "
              "see its --help)", file=sys.stderr)
        return 2
    if argv[:1] == ["stats"]:
        args, run = _stats_parser().parse_args(argv[1:]), _run_stats
    else:
        args, run = _eval_parser().parse_args(argv), _run_eval
    if args.batch_size < 1:
        print(f"fid_eval: error: --batch-size must be >= 1, got {args.batch_size}", file=sys.stderr)
        return 2
    try:
        if args.out is not None:
            check_output(args.out, args.overwrite)  # before any work
        run(args)
    except (FidEvalError, OutputError) as e:
        print(f"fid_eval: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
