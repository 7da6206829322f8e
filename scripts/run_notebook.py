#!/usr/bin/env python3
"""Execute example notebooks with this environment's Python and save them with their outputs.

    .venv/bin/python scripts/run_notebook.py examples/02_train_and_evaluate_sim.ipynb
    .venv/bin/python scripts/run_notebook.py examples/*.ipynb --size small --out /tmp/executed

Each notebook runs in a fresh kernel of the running interpreter, in a working directory of its own
(``--workdir``, default ``work/<notebook name>``), at ``--size`` (``full``: the numbers the README
quotes; ``small``: what CI runs). The executed copy goes to ``--out`` (default ``results/notebooks``);
the committed notebooks stay clean. Exits non-zero, naming the cell, if a cell fails.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--size", choices=("full", "small"), default="full")
    parser.add_argument("--workdir", type=Path, default=Path("work"))
    parser.add_argument("--out", type=Path, default=Path("results/notebooks"))
    parser.add_argument("--cell_timeout", type=int, default=1800, help="seconds per cell")
    args = parser.parse_args(argv)

    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    os.environ["SIM_MERLIN_EXAMPLE_SIZE"] = args.size
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with tempfile.TemporaryDirectory() as jupyter:
        spec = Path(jupyter) / "kernels" / "sim-merlin"
        spec.mkdir(parents=True)
        (spec / "kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "sim-merlin", "language": "python"}))
        os.environ["JUPYTER_PATH"] = jupyter
        for path in args.notebooks:
            cwd = (args.workdir / path.stem).resolve()
            cwd.mkdir(parents=True, exist_ok=True)
            notebook = nbformat.read(path, as_version=4)
            client = NotebookClient(notebook, kernel_name="sim-merlin",
                                    timeout=args.cell_timeout,
                                    resources={"metadata": {"path": str(cwd)}})
            started = time.perf_counter()
            try:
                client.execute()
            except (CellExecutionError, CellTimeoutError) as error:
                print(f"{path}: {error}", file=sys.stderr)
                return 1
            args.out.mkdir(parents=True, exist_ok=True)
            target = args.out / path.name
            partial = target.with_suffix(".partial")
            nbformat.write(notebook, partial)
            partial.replace(target)
            print(f"{path}: {time.perf_counter() - started:.0f} s at size {args.size} -> {target}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
