#!/usr/bin/env python
"""Preprocess Amazon Reviews 2014 layout logs into SIM training data (parquet + Merlin schema).

    python workflows/preprocess.py --reviews reviews_Books.json --meta meta_Books.json --output DIR

The reference's flags work too:

    python workflows/preprocess.py --amazon_dataset_path /data/amazon_books_2014 \\
        --reviews_file_name reviews_Books.json --metadata_file_name meta_Books.json \\
        --output_path /data/parquet

Output: DIR/train/*.parquet and DIR/test/*.parquet, each with its schema.pbtxt (tags in
schemas/README.md), DIR/workflow (the fitted NVTabular encode workflow) and DIR/preprocess.json
(counts, cardinalities, stage times). See the README's "Preprocessing" section.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __name__ == "__main__" and os.environ.get("PYTHONHASHSEED") != "0":
    # Byte-identical output run after run: Python's string hashing is seeded per process, and
    # the order of set elements (the tags written into schema.pbtxt and the saved workflow)
    # follows it. Start again with a fixed seed before doing anything.
    os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]],
              {**os.environ, "PYTHONHASHSEED": "0"})

import sim_merlin  # noqa: F401  (environment set-up before Merlin imports)
from sim_merlin.environment import quiet_merlin_notices

# We announce the CPU/GPU path ourselves; Merlin's notices would repeat it for every dataset.
quiet_merlin_notices()
from sim_merlin.preprocessing.pipeline import (  # noqa: E402
    PreprocessConfig,
    PreprocessingError,
    preprocess,
)
from sim_merlin.preprocessing.raw import RawInputError  # noqa: E402


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python workflows/preprocess.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    files = parser.add_argument_group("input and output")
    files.add_argument("--reviews", type=Path, help="reviews file (JSON lines, may be .gz)")
    files.add_argument("--meta", type=Path, help="meta file (Python-literal or JSON lines, may be .gz)")
    files.add_argument("--output", type=Path, help="output directory (must not exist unless --overwrite)")
    files.add_argument("--amazon_dataset_path", type=Path,
                       help="reference style: directory holding the two files")
    files.add_argument("--reviews_file_name", default="reviews_Books.json",
                       help="reference style: reviews file name in --amazon_dataset_path")
    files.add_argument("--metadata_file_name", default="meta_Books.json",
                       help="reference style: meta file name in --amazon_dataset_path")
    files.add_argument("--output_path", type=Path, help="reference style: same as --output")
    files.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    semantics = parser.add_argument_group("samples")
    semantics.add_argument("--min_user_interactions", "--shortest_sequence_for_user", type=int,
                           default=20, help="keep users with at least this many reviews")
    semantics.add_argument("--max_sequence_length", type=int, default=100,
                           help="history length (most recent behaviours, left-padded)")
    semantics.add_argument("--shortest_sequence_for_training", type=int, default=1,
                           help="a training sample needs at least this many prior behaviours")
    semantics.add_argument("--seed", type=int, default=12345)
    semantics.add_argument("--exclude_positive_negatives", action="store_true",
                           help="redraw a negative target that equals the positive one")
    semantics.add_argument("--keep_duplicates", action="store_true",
                           help="keep exact duplicate reviews as separate behaviours (reference)")
    semantics.add_argument("--item_features", type=_names, default=(),
                           help="extra meta fields to use as item features, comma-separated")
    semantics.add_argument("--user_features", type=_names, default=(),
                           help="extra review fields to use as user features (latest value)")
    running = parser.add_argument_group("running")
    running.add_argument("--skip_bad_lines", action="store_true",
                         help="skip and count malformed lines instead of stopping at the first")
    running.add_argument("--workers", "--metadata_loader_n_proc", "--review_loader_num_workers",
                         type=int, default=0, help="parsing processes (0 = one per core, max 8)")
    running.add_argument("--users_per_partition", type=int, default=2000,
                         help="users per partition of the sample stage (bounds memory)")
    running.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                         help="GPU (cuDF) when available with auto")
    return parser


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> PreprocessConfig:
    base = args.amazon_dataset_path
    reviews = args.reviews or (base / args.reviews_file_name if base else None)
    meta = args.meta or (base / args.metadata_file_name if base else None)
    output = args.output or args.output_path
    if reviews is None or meta is None or output is None:
        parser.error(
            "give --reviews, --meta and --output (or --amazon_dataset_path and --output_path)"
        )
    try:
        return PreprocessConfig(
            reviews=reviews, meta=meta, output=output,
            min_user_interactions=args.min_user_interactions,
            max_sequence_length=args.max_sequence_length,
            min_history=args.shortest_sequence_for_training,
            seed=args.seed,
            item_features=args.item_features, user_features=args.user_features,
            exclude_positive_negatives=args.exclude_positive_negatives,
            keep_duplicates=args.keep_duplicates, skip_bad_lines=args.skip_bad_lines,
            overwrite=args.overwrite, workers=args.workers,
            users_per_partition=args.users_per_partition, device=args.device,
        )
    except ValueError as err:
        parser.error(str(err))


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    config = config_from_args(args, parser)
    try:
        summary = preprocess(config)
    except (RawInputError, PreprocessingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    skipped = summary["bad_review_lines_skipped"] + summary["bad_meta_lines_skipped"]
    print(
        f"{summary['users']:,} users, {summary['interactions_kept']:,} behaviours -> "
        f"{summary['train_rows']:,} train and {summary['test_rows']:,} test samples in "
        f"{config.output}" + (f" ({skipped:,} bad lines skipped)" if skipped else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
