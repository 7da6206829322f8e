#!/usr/bin/env python
"""Training throughput with and without the fused kernels, measured alternately (not a test).

    .venv/bin/python bench/fused_kernels.py --models sim dien --rounds 3

On a shared machine runs drift by 10-20% over minutes, so a with/without comparison made of two
separate benchmark sessions says little. This runs ``bench/train.py`` once per variant
(``SIM_MERLIN_FUSED_KERNELS=1`` then ``=0``) per round, ``--rounds`` times, for each model and
config, and reports the median of each variant and their ratio. Writes ``--json``.
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

VARIANTS = {"fused": "1", "plain": "0"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["sim", "dien"])
    parser.add_argument("--configs", nargs="+", default=["ref-compatible amp intra1"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path,
                        default=ROOT / "bench" / "results" / "fused_kernels.json")
    args = parser.parse_args(argv)
    rows, records = [], []
    for model in args.models:
        for config in args.configs:
            figures = {name: [] for name in VARIANTS}
            for round_ in range(args.rounds):
                for name, value in VARIANTS.items():
                    with tempfile.TemporaryDirectory() as tmp:
                        out = Path(tmp) / "run.json"
                        subprocess.run(
                            [sys.executable, str(ROOT / "bench" / "train.py"), "--models", model,
                             "--batch_sizes", "4096", "--configs", config, "--repeats", "1",
                             "--warmup", "10", "--steps", "30", "--json", str(out)],
                            check=True, env={**os.environ, "SIM_MERLIN_FUSED_KERNELS": value},
                            stdout=subprocess.DEVNULL)
                        result = json.loads(out.read_text())["results"][0]
                    figures[name].append(result["throughput_median"])
                    print(f"{model} {config} {name} round {round_ + 1}: "
                          f"{figures[name][-1]:,.0f} samples/s", flush=True)
            fused, plain = (statistics.median(figures[n]) for n in VARIANTS)
            rows.append([model, config, f"{fused:,.0f}", f"{plain:,.0f}", f"{fused / plain:.2f}"])
            records.append({"model": model, "config": config, "batch": 4096,
                            "fused_samples_per_s": figures["fused"],
                            "plain_samples_per_s": figures["plain"],
                            "fused_median": fused, "plain_median": plain})
    print_table(["model", "config", "fused", "plain", "ratio"], rows)
    write_json(args.json, {"command": " ".join(sys.argv), "rounds": args.rounds,
                           "results": records})
    return 0


if __name__ == "__main__":
    sys.exit(main())
