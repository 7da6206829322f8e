#!/usr/bin/env python
"""Inference throughput and latency of SIM, DIN and DIEN with Books-size tables (not a test).

    .venv/bin/python bench/inference.py --models sim --batch_sizes 4096 16384 65536 131072

``python -m sim_merlin.fit --mode inference`` over the training split of the Books-size data
(``bench/books_size_data.py``): the model scores each batch (no auxiliary loss, as the
reference's inference), per-step time including input, steps after warm-up (``--warmup`` at
batch 4096, fewer for larger batches, at least 1). Median of ``--repeats`` runs for samples/s
and latency p50/p90/p99 (ms per batch). Writes ``--json``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import books_size_data
from common import ROOT, median_of, print_table, run_fit, write_json

CONFIGS = {"fp32": [], "amp+xla": ["--amp", "--xla"], "amp": ["--amp"], "xla": ["--xla"],
           "ref-compatible amp": ["--reference_compatible", "--amp"],
           "ref-compatible amp+xla": ["--reference_compatible", "--amp", "--xla"],
           "ref-compatible amp intra1": ["--reference_compatible", "--amp",
                                         "--intra_op_parallelism", "1"],
           "ref-compatible amp intra1 shards2": ["--reference_compatible", "--amp",
                                                 "--intra_op_parallelism", "1",
                                                 "--inference_shards", "2"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["sim", "din", "dien"])
    parser.add_argument("--batch_sizes", type=int, nargs="+",
                        default=[4096, 16384, 65536, 131072])
    parser.add_argument("--configs", nargs="+", default=["fp32", "amp+xla"],
                        choices=sorted(CONFIGS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--data", type=Path, default=Path("/tmp/sim-merlin-bench/books-size"))
    parser.add_argument("--json", type=Path,
                        default=ROOT / "bench" / "results" / "inference.json")
    args = parser.parse_args(argv)
    books_size_data.write(args.data, 524_288, 131_072)
    rows, results = [], []
    for model in args.models:
        for config in args.configs:
            for batch in args.batch_sizes:
                warmup = max(1, args.warmup * 4096 // batch)
                runs = [run_fit(["--mode", "inference", "--model_type", model, "--dataset_dir",
                                 str(args.data), "--eval_batch_size", str(batch),
                                 "--global_batch_size", str(batch),
                                 "--benchmark_warmup_steps", str(warmup),
                                 "--seed", str(repeat + 1), *CONFIGS[config]],
                                f"{model} {config} batch {batch} run {repeat + 1}")
                        for repeat in range(args.repeats)]
                result = {"model": model, "config": config, "batch": batch,
                          "warmup_steps": warmup,
                          "measured_steps": runs[0].get("measured_steps"),
                          "throughput_median": median_of(runs, "throughput"),
                          "throughputs": [r["throughput"] for r in runs]}
                for key in ("latency_mean", "latency_p90", "latency_p99"):
                    result[f"{key}_ms_median"] = median_of(runs, key)
                results.append(result)
                rows.append([model, config, batch, result["throughput_median"],
                             result["latency_mean_ms_median"], result["latency_p90_ms_median"],
                             result["latency_p99_ms_median"]])
    print()
    print_table(["model", "config", "batch", "samples/s", "mean ms", "p90 ms", "p99 ms"], rows)
    write_json(args.json, {"command": " ".join(sys.argv), "repeats": args.repeats,
                           "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
