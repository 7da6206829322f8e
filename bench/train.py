#!/usr/bin/env python
"""Training throughput of SIM, DIN and DIEN with Books-size tables (not a test).

    .venv/bin/python bench/train.py --models sim din dien --batch_sizes 4096 16384 --repeats 3

Measures as the reference does: ``python -m sim_merlin.fit --benchmark`` on data at the Amazon
Books cardinality (``bench/books_size_data.py``: users 105,925, items 1,209,081, categories
2,330, E 16, history 100 split 90/10), per-step time including input, steps after warm-up only
(``--warmup`` steps, then ``--steps``; at batch 16384 a quarter of each, so that one epoch holds
them and no epoch boundary falls inside the measurement). Each configuration runs ``--repeats``
times; the table shows the median, the spread, the achieved FLOP/s (``bench/flops.py``) and its
fraction of the measured bfloat16/float32 matmul peak, and, with ``--auc_dataset``, the test AUC
of a short training run on real-structured data with the same options (speed must not cost AUC).
Writes ``--json``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import books_size_data
import flops
from common import ROOT, median_of, print_table, run_fit, write_json

CONFIGS = {
    "fp32": [],
    "amp": ["--amp"],
    "amp+xla": ["--amp", "--xla"],
    "ref-compatible amp": ["--reference_compatible", "--amp"],
    "ref-compatible amp+xla": ["--reference_compatible", "--amp", "--xla"],
    "ref-compatible fp32": ["--reference_compatible"],
    "ref-compatible amp deterministic": ["--reference_compatible", "--amp", "--deterministic"],
    "ref-compatible amp intra1": ["--reference_compatible", "--amp", "--intra_op_parallelism", "1"],
    "ref-compatible amp intra1 lazy_adam": ["--reference_compatible", "--amp",
                                            "--intra_op_parallelism", "1",
                                            "--optimizer", "lazy_adam"],
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["sim", "din", "dien"])
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--configs", nargs="+", default=["fp32", "amp+xla"],
                        choices=sorted(CONFIGS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--data", type=Path, default=Path("/tmp/sim-merlin-bench/books-size"))
    parser.add_argument("--auc_dataset", type=Path, default=None,
                        help="a preprocessed data set (e.g. data/processed from the quickstart) "
                             "to report the test AUC of 1 epoch at batch 4096 for each option set")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "train.json")
    args = parser.parse_args(argv)
    books_size_data.write(args.data, 524_288, 131_072)
    peak = {dtype: flops.measured_peak(dtype) for dtype in ("float32", "bfloat16")}
    rows, results = [], []
    for model in args.models:
        for config in args.configs:
            options = CONFIGS[config]
            per_sample = flops.training_flops(
                model, reference_compatible="--reference_compatible" in options)
            auc = None
            if args.auc_dataset:
                record = run_fit(["--mode", "train", "--model_type", model, "--dataset_dir",
                                  str(args.auc_dataset), "--global_batch_size", "4096",
                                  "--epochs", "1", "--seed", "1", "--no_train_eval", *options],
                                 f"{model} {config} AUC run")
                auc = record["test_auc"]
            for batch in args.batch_sizes:
                scale = max(1, batch // 4096)
                warmup, steps = max(2, args.warmup // scale), max(5, args.steps // scale)
                runs = [run_fit(["--model_type", model, "--dataset_dir", str(args.data),
                                 "--global_batch_size", str(batch), "--benchmark",
                                 "--benchmark_warmup_steps", str(warmup),
                                 "--benchmark_steps", str(steps), "--epochs", "1000",
                                 "--seed", str(repeat + 1), *options],
                                f"{model} {config} batch {batch} run {repeat + 1}")
                        for repeat in range(args.repeats)]
                throughput = median_of(runs, "throughput")
                achieved = throughput * per_sample
                peak_dtype = "bfloat16" if "--amp" in options else "float32"
                result = {
                    "model": model, "config": config, "options": options, "batch": batch,
                    "warmup_steps": warmup, "steps": steps,
                    "throughput_median": throughput,
                    "throughputs": [r["throughput"] for r in runs],
                    "latency_p99_ms_median": median_of(runs, "latency_p99"),
                    "training_flops_per_sample": per_sample,
                    "achieved_gflops": achieved / 1e9,
                    "fraction_of_peak": achieved / peak[peak_dtype], "peak_dtype": peak_dtype,
                    "test_auc_1_epoch": auc,
                }
                results.append(result)
                write_json(args.json, {"command": " ".join(sys.argv), "repeats": args.repeats,
                                       "peak_flops": peak, "results": results})
                spread = [r["throughput"] for r in runs]
                rows.append([model, config, batch, throughput,
                             f"{min(spread):,.0f}-{max(spread):,.0f}",
                             result["latency_p99_ms_median"], f"{achieved / 1e9:.0f}",
                             f"{result['fraction_of_peak']:.0%} {peak_dtype[:4]}",
                             "-" if auc is None else f"{auc:.4f}"])
    print()
    print_table(["model", "config", "batch", "samples/s", "range", "p99 ms", "GFLOP/s",
                 "of peak", "AUC"], rows)
    write_json(args.json, {"command": " ".join(sys.argv), "repeats": args.repeats,
                           "peak_flops": peak, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
