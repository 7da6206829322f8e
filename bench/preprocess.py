#!/usr/bin/env python
"""Preprocessing time and peak memory at fractions of the Amazon Books size (not a test).

    .venv/bin/python bench/preprocess.py --fractions 0.01 0.1 1.0 --work /tmp/sim-bench

For each fraction it generates (once, cached under --work) the built-in data set with the
``amazon-books`` preset scaled to that fraction of users and items, runs
``workflows/preprocess.py`` in a child process, samples the resident memory of the whole process
tree every 0.2 s, and reports wall time, peak RSS, the time of each stage and the output sizes.
Prints a table and writes ``--json`` (default ``bench/results/preprocess.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
BOOKS_USERS = 8_026_324
BOOKS_ITEMS = 2_370_585


def tree_rss(process: psutil.Process) -> int:
    total = 0
    for proc in [process, *process.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def run_measured(command: list[str], log: Path) -> tuple[float, int, int]:
    """(wall seconds, peak RSS bytes of the process tree, exit code)."""
    started = time.perf_counter()
    with open(log, "w") as handle:
        child = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
        watched = psutil.Process(child.pid)
        peak = 0
        while child.poll() is None:
            peak = max(peak, tree_rss(watched))
            time.sleep(0.2)
    return time.perf_counter() - started, peak, child.returncode


def stage_seconds(log: Path) -> dict:
    """The ``[preprocess] <stage>: <seconds> s`` lines the command prints."""
    return {name: float(seconds) for name, seconds in
            re.findall(r"^\[preprocess\] ([a-z ]+): ([0-9.]+) s$", log.read_text(), re.M)}


def dataset(fraction: float, work: Path) -> Path:
    out = work / f"raw-{fraction:g}"
    if (out / "reviews_Books.json").exists() and (out / "meta_Books.json").exists():
        return out
    users = max(1000, round(BOOKS_USERS * fraction))
    items = max(1000, round(BOOKS_ITEMS * fraction))
    subprocess.run(
        [sys.executable, "-m", "sim_merlin.datasets.synthetic", "--preset", "amazon-books",
         "--users", str(users), "--items", str(items), "--out", str(out), "--overwrite"],
        check=True,
    )
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1])
    parser.add_argument("--work", type=Path, default=Path("/tmp/sim-merlin-bench"))
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "preprocess.json")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="further options for workflows/preprocess.py")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for fraction in args.fractions:
        raw = dataset(fraction, args.work)
        out = args.work / f"processed-{fraction:g}"
        log = args.work / f"preprocess-{fraction:g}.log"
        command = [sys.executable, str(ROOT / "workflows" / "preprocess.py"),
                   "--amazon_dataset_path", str(raw), "--output_path", str(out), "--overwrite",
                   *args.extra]
        seconds, peak, code = run_measured(command, log)
        if code != 0:
            print(log.read_text()[-3000:], file=sys.stderr)
            return code
        summary = json.loads((out / "preprocess.json").read_text())
        rows.append({
            "fraction": fraction,
            "review_lines": summary["review_lines"],
            "users_kept": summary["users"],
            "train_rows": summary["train_rows"],
            "test_rows": summary["test_rows"],
            "wall_seconds": round(seconds, 1),
            "peak_rss_gib": round(peak / 2**30, 2),
            "stage_seconds": stage_seconds(log),
            "output_gib": round(sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**30, 2),
            "cpus": os.cpu_count(),
        })
        print(f"fraction {fraction:g}: {seconds:.0f} s, peak {peak / 2**30:.2f} GiB", flush=True)
    header = f"{'fraction':>8} {'reviews':>12} {'users':>8} {'train rows':>12} {'wall s':>8} {'peak GiB':>9}  stages (s)"
    print(header)
    for r in rows:
        stages = ", ".join(f"{k} {v:g}" for k, v in r["stage_seconds"].items())
        print(f"{r['fraction']:>8g} {r['review_lines']:>12,} {r['users_kept']:>8,} "
              f"{r['train_rows']:>12,} {r['wall_seconds']:>8.0f} {r['peak_rss_gib']:>9.2f}  {stages}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"command": " ".join(sys.argv), "results": rows}, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
