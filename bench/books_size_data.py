#!/usr/bin/env python
"""Preprocessed-layout data at the Amazon Books cardinality, for the speed benchmarks.

    .venv/bin/python bench/books_size_data.py --out /tmp/sim-merlin-bench/books-size --rows 524288

Writes ``OUT/train`` and ``OUT/test``: parquet files plus the Merlin ``schema.pbtxt``, exactly the
columns and tags ``workflows/preprocess.py`` produces, with the reference README's table sizes
(users 105,925, items 1,209,081, categories 2,330) and history length 100. Ids are drawn with
Zipf-like popularity (as real item ids are); history lengths are log-normal (median 40) clipped
to 1..100 and left-padded with 0; the negative history is as long as the history. The files have
the layout the preprocessing writes: uncompressed, every column required (non-nullable:
:mod:`sim_merlin.preprocessing.required_columns`). Labels
alternate 1, 0 as the reference's samples do (a positive and its negative). Speed does not
depend on what the ids mean, only on how many distinct rows a batch touches, which the Zipf
draw keeps realistic. Reused when it already exists with the same arguments.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BOOKS_SIZE = {"users": 105_925, "items": 1_209_081, "categories": 2_330}
HISTORY_LENGTH = 100


def _popular_ids(rng: np.random.Generator, n: int, cardinality: int, shape) -> np.ndarray:
    """Ids in 1 .. cardinality - 1, popular ones more often (a Zipf-like draw, exponent ~1)."""
    u = rng.random(shape)
    # Inverse CDF of a 1/x density over [1, n]: exp(u * ln n).
    ids = np.exp(u * np.log(cardinality - 1)).astype(np.int64)
    return np.clip(ids, 1, cardinality - 1).astype(np.int32)


def make_split(rows: int, seed: int, sizes: dict, history: int = HISTORY_LENGTH):
    import pandas as pd

    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(np.log(40), 0.8, rows)), 1, history).astype(int)
    mask = np.arange(history)[None, :] >= (history - lengths)[:, None]
    columns = {
        "label": (np.arange(rows) % 2 == 0).astype(np.int8),
        "user_id": _popular_ids(rng, rows, sizes["users"], rows).astype(np.int64),
        "item_id": _popular_ids(rng, rows, sizes["items"], rows),
        "category_id": rng.integers(1, sizes["categories"], rows).astype(np.int32),
    }
    for suffix in ("_history", "_neg_history"):
        items = _popular_ids(rng, rows, sizes["items"], (rows, history)) * mask
        categories = rng.integers(1, sizes["categories"], (rows, history)).astype(np.int32) * mask
        columns["item_id" + suffix] = list(items.astype(np.int32))
        columns["category_id" + suffix] = list(categories.astype(np.int32))
    return pd.DataFrame(columns)


def write(out: Path, rows: int, test_rows: int, seed: int = 7, partition_rows: int = 65536,
          sizes: dict | None = None) -> Path:
    """Write (or reuse) the data set under ``out``; returns ``out``."""
    from merlin.schema.io.tensorflow_metadata import TensorflowMetadata

    from sim_merlin.preprocessing.required_columns import require_values
    from sim_merlin.schema import sample_schema

    sizes = sizes or BOOKS_SIZE
    stamp = {"rows": rows, "test_rows": test_rows, "seed": seed, "sizes": sizes,
             "partition_rows": partition_rows, "history": HISTORY_LENGTH,
             "layout": "uncompressed, required columns"}
    if (out / "stamp.json").exists() and json.loads((out / "stamp.json").read_text()) == stamp:
        return out
    temporary = out.with_name(out.name + ".partial")
    shutil.rmtree(temporary, ignore_errors=True)
    schema = sample_schema({"item_id": sizes["items"], "category_id": sizes["categories"]},
                           {"user_id": sizes["users"]}, HISTORY_LENGTH)
    for split, count, split_seed in (("train", rows, seed), ("test", test_rows, seed + 1)):
        directory = temporary / split
        directory.mkdir(parents=True)
        for part, start in enumerate(range(0, count, partition_rows)):
            frame = make_split(min(partition_rows, count - start), split_seed * 1000 + part, sizes)
            frame.to_parquet(directory / f"part_{part}.parquet", index=False, compression=None)
            print(f"{split}: {start + len(frame):,} / {count:,} rows", file=sys.stderr, flush=True)
        require_values(directory)  # the file layout workflows/preprocess.py writes
        TensorflowMetadata.from_merlin_schema(schema).to_proto_text_file(str(directory))
    (temporary / "stamp.json").write_text(json.dumps(stamp))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(temporary, out)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/sim-merlin-bench/books-size"))
    parser.add_argument("--rows", type=int, default=524_288, help="training rows")
    parser.add_argument("--test_rows", type=int, default=131_072)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    print(write(args.out, args.rows, args.test_rows, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
