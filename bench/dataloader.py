#!/usr/bin/env python
"""Samples/s the Merlin dataloader delivers, parquet to the model's input dict (not a test).

    .venv/bin/python bench/dataloader.py --batch_sizes 4096 16384

Reads the training split of the Books-size data (``bench/books_size_data.py``) with the loader
``python -m sim_merlin.fit`` trains from (``sim_merlin.training.data``: Merlin's TensorFlow
dataloader, shuffled, fixed-length history lists stacked with numpy), one pass per repeat, and
touches every tensor (so lazily-produced batches are counted). Reports samples/s (median of
``--repeats`` passes) next to the fastest training throughput in
``bench/results/train*.json``, if any: the loader must be well ahead of training, since both
share the CPU. Writes ``--json``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import books_size_data
from common import ROOT, print_table, write_json


def one_pass(split, batch: int, seed: int) -> tuple[float, int]:
    loader = split.loader(batch, shuffle=True, seed=seed)
    started = time.perf_counter()
    samples = 0
    for features, labels in loader:
        for value in features.values():
            value.shape  # noqa: B018  (the tensors exist: that is what is timed)
        samples += int(labels.shape[0])
    seconds = time.perf_counter() - started
    if hasattr(loader, "stop"):
        loader.stop()
    return samples / seconds, samples


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", type=Path, default=Path("/tmp/sim-merlin-bench/books-size"))
    parser.add_argument("--json", type=Path,
                        default=ROOT / "bench" / "results" / "dataloader.json")
    args = parser.parse_args(argv)
    books_size_data.write(args.data, 524_288, 131_072)
    from sim_merlin.environment import quiet_merlin_notices
    from sim_merlin.training.data import open_split

    quiet_merlin_notices()
    split = open_split(args.data / "train")
    training = {}
    for train_json in sorted((ROOT / "bench" / "results").glob("train*.json")):
        for r in json.loads(train_json.read_text())["results"]:
            key = r["batch"]
            training[key] = max(training.get(key, 0.0), r["throughput_median"])
    rows, results = [], []
    for batch in args.batch_sizes:
        rates = [one_pass(split, batch, seed)[0] for seed in range(args.repeats)]
        rate = statistics.median(rates)
        fastest = training.get(batch)
        results.append({"batch": batch, "samples_per_s_median": rate, "samples_per_s": rates,
                        "fastest_training_samples_per_s": fastest})
        rows.append([batch, rate, f"{min(rates):,.0f}-{max(rates):,.0f}",
                     "-" if fastest is None else fastest,
                     "-" if fastest is None else f"{rate / fastest:.1f}x"])
    print_table(["batch", "loader samples/s", "range", "fastest training", "headroom"], rows)
    write_json(args.json, {"command": " ".join(sys.argv), "rows": split.rows,
                           "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
