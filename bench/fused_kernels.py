#!/usr/bin/env python
"""Training throughput with and without the fused kernels, measured alternately (not a test).

    .venv/bin/python bench/fused_kernels.py --models sim dien --rounds 3

On a shared machine runs drift by 10-20% over minutes, so a with/without comparison made of two
separate benchmark sessions says little. This runs ``bench/train.py`` once per variant per
round, ``--rounds`` times, for each model and config, and reports the median of each variant and
its ratio to the plain path. The variants: the fused kernels as they run here; the same with
``SIM_MERLIN_KERNEL_AMX=0`` (bfloat16 products on AVX512-BF16 instead of AMX tiles; only on a
CPU with AMX); the plain TensorFlow ops (``SIM_MERLIN_FUSED_KERNELS=0``). Writes ``--json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, print_table, write_json

VARIANTS = {"fused": {"SIM_MERLIN_FUSED_KERNELS": "1"},
            "fused, no AMX": {"SIM_MERLIN_FUSED_KERNELS": "1", "SIM_MERLIN_KERNEL_AMX": "0"},
            "plain": {"SIM_MERLIN_FUSED_KERNELS": "0"}}


def variants() -> dict:
    from sim_merlin.kernels.build import cpu_has_amx

    return {name: env for name, env in VARIANTS.items() if cpu_has_amx() or "AMX" not in name}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["sim", "dien"])
    parser.add_argument("--configs", nargs="+", default=["ref-compatible amp intra1"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path,
                        default=ROOT / "bench" / "results" / "fused_kernels.json")
    args = parser.parse_args(argv)
    rows, records = [], []
    chosen = variants()
    for model in args.models:
        for config in args.configs:
            figures = {name: [] for name in chosen}
            for round_ in range(args.rounds):
                for name, env in chosen.items():
                    with tempfile.TemporaryDirectory() as tmp:
                        out = Path(tmp) / "run.json"
                        subprocess.run(
                            [sys.executable, str(ROOT / "bench" / "train.py"), "--models", model,
                             "--batch_sizes", "4096", "--configs", config, "--repeats", "1",
                             "--warmup", "10", "--steps", "30", "--json", str(out)],
                            check=True, env={**os.environ, **env},
                            stdout=subprocess.DEVNULL)
                        result = json.loads(out.read_text())["results"][0]
                    figures[name].append(result["throughput_median"])
                    print(f"{model} {config} {name} round {round_ + 1}: "
                          f"{figures[name][-1]:,.0f} samples/s", flush=True)
            medians = {name: statistics.median(figures[name]) for name in chosen}
            plain = medians["plain"]
            rows.append([model, config, *(f"{m:,.0f} ({m / plain:.2f})" for m in medians.values())])
            records.append({"model": model, "config": config, "batch": 4096,
                            "samples_per_s": figures, "medians": medians})
    print_table(["model", "config", *(f"{n} (ratio to plain)" for n in chosen)], rows)
    write_json(args.json, {"command": " ".join(sys.argv), "rounds": args.rounds,
                           "results": records})
    return 0


if __name__ == "__main__":
    sys.exit(main())
