#!/usr/bin/env python
"""Where a training step's time goes: TensorFlow profiler, op time by type and by layer.

    .venv/bin/python bench/profile_step.py --model_type sim --global_batch_size 4096 [--amp]

Builds the model exactly as ``python -m sim_merlin.fit`` does (same options), takes ``--batches``
batches of the Books-size benchmark data (``bench/books_size_data.py``) into memory (one by
default; with several, the steps cycle through them, so the embedding rows read and updated
differ from step to step as in training, and Adam's deferred rows have steps to catch up: with
one batch every step reads the rows the step before updated), runs a few warm-up
steps, then profiles ``--steps`` training steps with ``tf.profiler`` and sums the op times it
recorded (all threads) by op type and by the model scope an op belongs to. Prints two tables and
writes ``--json``. The wall time per step is printed too: op time exceeds it when ops run
in parallel on both cores.
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def op_times(logdir: str) -> tuple[dict, dict]:
    """(seconds by op type, by scope, by op) from the profiler's xplane files under logdir."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    by_type, by_scope, by_op = collections.Counter(), collections.Counter(), collections.Counter()
    for path in glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True):
        space = xplane_pb2.XSpace()
        space.ParseFromString(Path(path).read_bytes())
        for plane in space.planes:
            if plane.name != "/host:CPU":
                continue
            metadata = plane.event_metadata
            for line in plane.lines:
                if not line.name.startswith("tf_") and "Executor" not in line.name:
                    pass
                for event in line.events:
                    name = metadata[event.metadata_id].name
                    if ":" not in name or name.startswith(("tf_", "Executor", "__inference",
                                                           "EagerLocalExecute", "KernelAndDevice")):
                        continue
                    scope, kind = name.rsplit(":", 1)
                    seconds = event.duration_ps * 1e-12
                    by_type[kind] += seconds
                    parts = [p for p in scope.split("/") if p and not p.startswith("while")]
                    key = "/".join(parts[:3]) if parts else scope
                    by_scope[key] += seconds
                    by_op[name] += seconds
    return dict(by_type), dict(by_scope), dict(by_op)


ELEMENTWISE = {"Mul", "AddV2", "Sub", "SelectV2", "Sigmoid", "Tanh", "SigmoidGrad", "TanhGrad",
               "Neg", "Sum", "BiasAddGrad", "BiasAdd", "Softmax", "_MklSoftmax", "RealDiv",
               "Maximum", "Max", "Exp", "Log1p", "Softplus", "AddN", "Relu", "ReluGrad"}
MOVEMENT = {"ConcatV2", "Slice", "Split", "SplitV", "Pack", "Unpack", "_MklTranspose", "Tile",
            "Transpose", "Reshape", "StridedSlice", "StridedSliceGrad", "Cast", "OneHot",
            "TopKV2", "Fill"}
LOOKUPS = {"UnsortedSegmentSum", "ResourceGather", "GatherV2", "ScatterNd",
           "SimMerlinEmbeddingRows", "SimMerlinEmbeddingRowsGrad"}


def group_of(op: str) -> str:
    """A coarse kind of work for one op name ``scope:type``."""
    kind = op.rsplit(":", 1)[1]
    if "Adam" in op or "SGD" in op:  # incl. the deferred Adam rows' catch-up at the lookups
        return "optimizer update (incl. summing sparse rows)"
    if kind in LOOKUPS:  # the fused lookups too
        return "embedding lookups, gathers and their gradients"
    if kind.startswith("SimMerlin"):
        return "fused kernels (GRU, AUGRU, sigmoid MLPs, dot attention, top-k; forward and gradient)"
    if "MatMul" in kind:
        return "matrix products"
    if kind in ELEMENTWISE:
        return "element-wise ops and reductions"
    if kind in MOVEMENT:
        return "data movement (concat, split, stack, transpose, cast, top-k)"
    return "other"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("/tmp/sim-merlin-bench/books-size"))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--batches", type=int, default=1,
                        help="distinct batches held in memory; the steps cycle through them")
    parser.add_argument("--predict", action="store_true",
                        help="profile the inference step (no gradients, no auxiliary loss)")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "profile.json")
    args, fit_args = parser.parse_known_args(argv)

    import books_size_data
    from sim_merlin.environment import quiet_merlin_notices

    quiet_merlin_notices()
    books_size_data.write(args.data, 524_288, 131_072)
    from sim_merlin import fit

    fit_options = fit.build_parser().parse_args(
        ["--dataset_dir", str(args.data), "--seed", "1", "--progress", "off", *fit_args])
    run = fit.Run(fit_options)
    train = run.split("train")
    trainer = run.build(train.schema, run._first_features(train))
    loader = train.loader(run.local_batch)
    batches = []
    for features, labels in loader:
        batches.append((features, labels))
        if len(batches) == max(1, args.batches):
            break
    loader.stop()
    import tensorflow as tf

    steps_taken = [0]

    def step():
        features, labels = batches[steps_taken[0] % len(batches)]
        steps_taken[0] += 1
        if args.predict:
            trainer.predict_step(features).numpy()
        else:
            trainer.train_step(features, labels)["total_loss"].numpy()

    for _ in range(args.warmup):
        step()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    wall = (time.perf_counter() - started) / args.steps
    logdir = tempfile.mkdtemp(prefix="sim-profile-")
    tf.profiler.experimental.start(logdir)
    for _ in range(args.steps):
        step()
    tf.profiler.experimental.stop()
    by_type, by_scope, by_op = op_times(logdir)
    shutil.rmtree(logdir, ignore_errors=True)
    total = sum(by_type.values())
    batch = int(batches[0][1].shape[0])
    print(f"wall {1000 * wall:.1f} ms/step ({batch / wall:,.0f} samples/s); "
          f"op time {1000 * total / args.steps:.1f} ms/step")
    by_group = collections.Counter()
    for name, seconds in by_op.items():
        by_group[group_of(name)] += seconds
    for title, table in (("kind of work", by_group), ("op type", by_type), ("scope", by_scope),
                         ("op", by_op)):
        print(f"\n{title:<60} {'ms/step':>9} {'share':>7}")
        for name, seconds in sorted(table.items(), key=lambda kv: -kv[1])[:args.top]:
            print(f"{name[-60:]:<60} {1000 * seconds / args.steps:9.1f} {seconds / total:7.1%}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "options": fit_args, "step": "predict" if args.predict else "train", "batch": batch,
        "batches": len(batches), "wall_ms_per_step": 1000 * wall,
        "op_ms_per_step_by_group": {k: 1000 * v / args.steps for k, v in by_group.items()},
        "op_ms_per_step_by_type": {k: 1000 * v / args.steps for k, v in by_type.items()},
        "op_ms_per_step_by_scope": {k: 1000 * v / args.steps for k, v in by_scope.items()},
        "op_ms_per_step": {k: 1000 * v / args.steps for k, v in by_op.items()},
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
