#!/usr/bin/env python
"""The embedding optimizer's two ops on an Amazon Books-size item table, alone.

    .venv/bin/python bench/deferred_adam.py [--ids 454656] [--steps 36]

Dense Adam with deferred rows (``sim_merlin.kernels.adam``): each step brings the rows a batch
reads up to date (``catch_up``, at the lookups), then applies the step to the rows of the batch's
gradient (``deferred_update``). Here a float32 table of 1,209,081 x 16 (the items of Amazon
Books at E = 16) with its moments; each step reads ``--ids`` uniformly random ids (by default
what a SIM batch of 4096 reads from the item table: 111 per sample) with a gradient row each,
cycling through 12 such batches so every read row has zero-gradient steps to catch up. One
intra-op thread (the kernels split their rows over threads of their own), as the training
configuration measured in the README. Prints the median time of each op over ``--steps`` steps
after 12 warm-up steps, and writes ``--json``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from common import ROOT, print_table, write_json

BATCHES = 12  # batches of random ids cycled through (and steps of warm-up)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_209_081)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--ids", type=int, default=4096 * 111)
    parser.add_argument("--steps", type=int, default=36)
    parser.add_argument("--json", type=Path,
                        default=ROOT / "bench" / "results" / "deferred_adam.json")
    args = parser.parse_args(argv)

    import numpy as np

    import sim_merlin.tf_compat  # noqa: F401
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    from sim_merlin.kernels import adam, model_ops

    if not model_ops.available():
        print("the fused kernels are not available here: nothing to measure", file=sys.stderr)
        return 1
    rows, width = args.rows, args.width
    table = tf.Variable(tf.random.uniform([rows, width], -0.01, 0.01))
    m, v = tf.Variable(tf.zeros([rows, width])), tf.Variable(tf.zeros([rows, width]))
    steps = tf.Variable(tf.zeros([rows], tf.int32))
    rng = np.random.default_rng(0)
    batches = [tf.constant(rng.integers(0, rows, args.ids)) for _ in range(BATCHES)]
    gradient = tf.constant(rng.normal(size=(args.ids, width)).astype(np.float32) * 1e-3)
    hyper = (1e-3, 0.9, 0.999, 1e-7)
    shape = tf.constant([rows, width], tf.int64)

    @tf.function
    def catch_up(ids, step):
        adam.catch_up(table, m, v, steps, ids, *hyper, step - 1)

    @tf.function
    def update(ids, step):
        adam.deferred_update(table, m, v, steps, tf.IndexedSlices(gradient, ids, shape), *hyper,
                             step)

    times = {"catch_up": [], "deferred_update": []}
    for step in range(1, BATCHES + 1 + args.steps):
        ids, t = batches[step % len(batches)], tf.constant(step, tf.int64)
        started = time.perf_counter()
        catch_up(ids, t)
        between = time.perf_counter()
        update(ids, t)
        ended = time.perf_counter()
        if step > BATCHES:  # the first pass over the batches is the warm-up
            times["catch_up"].append(between - started)
            times["deferred_update"].append(ended - between)
    medians = {name: 1000 * statistics.median(values) for name, values in times.items()}
    print_table(["op", "median ms", "min ms"],
                [[name, medians[name], 1000 * min(times[name])] for name in times])
    write_json(args.json, {"command": " ".join(sys.argv), "rows": rows, "width": width,
                           "ids_per_step": args.ids, "steps": args.steps,
                           "median_ms": medians,
                           "ms": {k: [1000 * x for x in v] for k, v in times.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
