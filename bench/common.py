"""Shared by the benchmark scripts: run ``python -m sim_merlin.fit``, read its log, tabulate."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run_fit(args: list[str], label: str) -> dict:
    """Run the fit command with ``args``; return the log's final ``()`` record (throughput,
    latencies, AUC...) plus ``wall_s``. Raises with the command's output if it fails."""
    from sim_merlin.training.logger import read_log

    results = tempfile.mkdtemp(prefix="sim-bench-")
    command = [sys.executable, "-m", "sim_merlin.fit", "--results_dir", results,
               "--progress", "off", "--print_every", "0", *args]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{label}: exit {done.returncode}\n{' '.join(command)}\n"
                           f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    final = [e for e in read_log(os.path.join(results, "log.json"))
             if e["type"] == "LOG" and e["step"] == []]
    if not final:
        raise RuntimeError(f"{label}: no summary record in the log\n{done.stdout[-2000:]}")
    record = dict(final[-1]["data"])
    record["wall_s"] = wall
    print(f"  {label}: {record.get('throughput', float('nan')):,.0f} samples/s", flush=True)
    return record


def median_of(records: list[dict], key: str) -> float:
    return float(statistics.median(r[key] for r in records))


def print_table(columns: list[str], rows: list[list]) -> None:
    widths = [max(len(str(c)), *(len(_cell(r[i])) for r in rows)) for i, c in enumerate(columns)]
    print("  ".join(str(c).rjust(w) for c, w in zip(columns, widths)))
    for row in rows:
        print("  ".join(_cell(v).rjust(w) for v, w in zip(row, widths)))


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:,.4f}" if abs(value) < 10 else f"{value:,.0f}"
    return str(value)


def write_json(path: Path, payload: dict) -> None:
    """Write atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.partial")
    temporary.write_text(json.dumps(payload, indent=1))
    os.replace(temporary, path)
    print(f"wrote {path}")
