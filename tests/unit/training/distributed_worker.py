"""What each rank runs in test_distributed.py: ``python distributed_worker.py OUTDIR MODE``.

MODE ``collectives``: exercises every :class:`Distributed` operation with rank-specific inputs and
writes the inputs and results to ``OUTDIR/rank<N>.json``; the test checks them against numpy.
MODE ``die``: rank 1 exits with status 1 while rank 0 waits in a collective.
"""
import json
import os
import sys
import time
from pathlib import Path

STARTED = time.time()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import sim_merlin  # noqa: E402,F401  (Keras 2 before TensorFlow)
import tensorflow as tf  # noqa: E402

from sim_merlin.training.distributed import Distributed  # noqa: E402


def as_json(array) -> dict:
    array = np.asarray(array)
    return {"dtype": str(array.dtype), "shape": list(array.shape), "values": array.tolist()}


def gradient_json(gradient) -> dict:
    record = {"type": type(gradient).__name__, "dense": as_json(tf.convert_to_tensor(gradient))}
    if isinstance(gradient, tf.IndexedSlices):
        record["indices"] = gradient.indices.numpy().tolist()
    return record


def small_model(seed: int) -> tf.keras.Model:
    """Embedding (IndexedSlices gradients) -> flatten -> dense, with rank-specific weights."""
    tf.random.set_seed(seed)
    model = tf.keras.Sequential([
        tf.keras.layers.Embedding(10, 3, input_length=2),
        tf.keras.layers.Flatten(),
        tf.keras.layers.Dense(1),
    ])
    model.build([None, 2])
    return model


def collectives(group: Distributed, record: dict) -> None:
    rank = group.rank
    rng = np.random.default_rng(100 + rank)

    # allgather: different lengths, zero rows on one rank, dtypes kept.
    inputs = {
        "scores": rng.random(5 if rank == 0 else 0).astype(np.float32),
        "labels": rng.integers(0, 2, size=5 if rank == 0 else 0).astype(np.int64),
        "rows": rng.normal(size=(0 if rank == 0 else 3, 2)),  # float64, empty on rank 0
        "nothing": np.zeros([0, 4], np.float32),  # empty everywhere
    }
    record["allgather_inputs"] = {name: as_json(value) for name, value in inputs.items()}
    record["allgathered"] = {name: as_json(group.allgather(value))
                             for name, value in inputs.items()}

    # reductions
    steps, count = (7, 1) if rank == 0 else (5, 2)
    losses = (np.array([1.5, -2.0]) * (rank + 1) + rng.random(2)).astype(np.float32)
    record["reduce_inputs"] = {"steps": steps, "count": count, "losses": as_json(losses)}
    count_sum = group.allreduce_sum(count)
    record["reduced"] = {
        "min_steps": group.allreduce_min(steps),
        "max_steps": group.allreduce_max(steps),
        "count_sum": count_sum,
        "count_sum_type": type(count_sum).__name__,
        "losses_sum": as_json(group.allreduce_sum(losses)),
        "losses_max_scalar": float(group.allreduce_max(np.float32(losses[0]))),
        "losses_max_scalar_type": type(group.allreduce_max(np.float32(losses[0]))).__name__,
    }

    record["object"] = group.broadcast_object(
        {"run_id": "run-from-rank-0", "seed": 1234} if group.is_chief else None)

    # barrier: rank 1 arrives a second late; rank 0 must not leave before it arrives.
    if rank == 1:
        time.sleep(1.0)
    record["arrived_at_barrier"] = time.time()
    group.barrier()
    record["left_barrier"] = time.time()

    # broadcast_variables: rank-specific initial weights become rank 0's.
    model = small_model(seed=rank)
    variables = model.trainable_variables
    record["weights_before_broadcast"] = [as_json(v.numpy()) for v in variables]
    group.broadcast_variables(variables, root_rank=0)
    record["weights_after_broadcast"] = [as_json(v.numpy()) for v in variables]

    # gradients: rank-specific batches of different sizes sharing embedding row 3.
    ids = tf.constant([[1, 2], [3, 3]]) if rank == 0 else tf.constant([[3, 7]])
    targets = tf.constant([[0.5], [-1.0]]) if rank == 0 else tf.constant([[2.0]])

    def loss_fn():
        return tf.reduce_mean((model(ids) - targets) ** 2)

    with tf.GradientTape() as tape:
        loss = loss_fn()
    record["local_gradients"] = [gradient_json(g) for g in tape.gradient(loss, variables)]

    with tf.GradientTape() as tape:
        loss = loss_fn()
    averaged = group.gradient_tape(tape).gradient(loss, variables)
    record["tape_gradients"] = [gradient_json(g) for g in averaged]

    with tf.GradientTape() as tape:
        loss = loss_fn()
    dense = group.gradient_tape(tape, sparse_as_dense=True).gradient(loss, variables)
    record["tape_gradients_dense"] = [gradient_json(g) for g in dense]

    @tf.function
    def compiled_average():
        with tf.GradientTape() as tape:
            loss = loss_fn()
        return group.average_gradients(tape.gradient(loss, variables))

    record["average_gradients"] = [gradient_json(g) for g in compiled_average()]

    tf.keras.optimizers.SGD(learning_rate=0.1).apply_gradients(zip(averaged, variables))
    record["weights_after_step"] = [as_json(v.numpy()) for v in variables]


def main(outdir: Path, mode: str) -> None:
    group = Distributed.create(use_horovod="auto")
    record = {"rank": group.rank, "size": group.size, "local_rank": group.local_rank,
              "is_chief": group.is_chief, "enabled": group.enabled,
              "gloo_timeout": os.environ.get("HOROVOD_GLOO_TIMEOUT_SECONDS"),
              "seconds_to_create": time.time() - STARTED}
    if mode == "die":
        group.barrier()
        if group.rank == 1:
            os._exit(1)
        group.allgather(np.ones([2], np.float32))  # rank 1 never joins
    elif mode == "collectives":
        collectives(group, record)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    record["seconds_total"] = time.time() - STARTED
    (outdir / f"rank{group.rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
