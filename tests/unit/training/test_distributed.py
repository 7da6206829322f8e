"""sim_merlin.training.distributed: one process without Horovod, one Horovod process, and two real
Horovod processes (horovodrun, Gloo) checked against numpy."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from sim_merlin.training.distributed import (
    GLOO_TIMEOUT_VARIABLE,
    LAUNCHER_SIZE_VARIABLES,
    Distributed,
    launcher_size,
)

HOROVODRUN = Path(sys.executable).parent / "horovodrun"
WORKER = Path(__file__).with_name("distributed_worker.py")
pytestmark = pytest.mark.slow  # real horovodrun jobs
needs_horovodrun = pytest.mark.skipif(not HOROVODRUN.exists(),
                                      reason=f"Horovod is not installed ({HOROVODRUN} missing)")


@pytest.fixture
def no_launcher(monkeypatch):
    for name in LAUNCHER_SIZE_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def horovod_unimportable(monkeypatch):
    """Any `import horovod...` raises ImportError, as on a machine without Horovod."""
    monkeypatch.setitem(sys.modules, "horovod", None)
    monkeypatch.setitem(sys.modules, "horovod.tensorflow", None)


# -- one process, no Horovod ------------------------------------------------------------------

@pytest.mark.parametrize("environ, expected", [
    ({}, None),
    ({"HOROVOD_SIZE": "2", "HOROVOD_RANK": "1"}, 2),
    ({"OMPI_COMM_WORLD_SIZE": "4"}, 4),
    ({"PMI_SIZE": "1"}, 1),
    ({"HOROVOD_SIZE": ""}, None),
])
def test_launcher_size_reads_launcher_variables(environ, expected):
    assert launcher_size(environ) == expected


def test_auto_without_launcher_is_one_process_and_needs_no_horovod(no_launcher,
                                                                   horovod_unimportable):
    group = Distributed.create()
    assert (group.rank, group.size, group.local_rank, group.local_size) == (0, 1, 0, 1)
    assert group.is_chief and not group.enabled


def test_use_horovod_false_ignores_a_launcher(monkeypatch, horovod_unimportable):
    monkeypatch.setenv("HOROVOD_SIZE", "2")
    assert not Distributed.create(use_horovod=False).enabled


def test_missing_horovod_is_an_error_when_required(monkeypatch, no_launcher,
                                                   horovod_unimportable):
    with pytest.raises(ImportError, match="import horovod.tensorflow"):
        Distributed.create(use_horovod=True)
    monkeypatch.setenv("HOROVOD_SIZE", "2")  # launched on two processes: must not run twice alone
    with pytest.raises(ImportError, match="import horovod.tensorflow"):
        Distributed.create()
    monkeypatch.setenv("HOROVOD_SIZE", "1")  # launched alone: one process is what was asked for
    assert not Distributed.create().enabled


def test_use_horovod_must_be_auto_true_or_false():
    with pytest.raises(ValueError, match="use_horovod"):
        Distributed.create(use_horovod="yes")


def test_one_process_collectives_are_identities():
    group = Distributed()
    scores = np.array([[0.25, 0.5], [0.75, 1.0]], dtype=np.float32)
    gathered = group.allgather(scores)
    np.testing.assert_array_equal(gathered, scores)
    assert gathered.dtype == np.float32 and gathered is not scores
    empty = group.allgather(np.zeros([0, 3], np.int64))
    assert empty.shape == (0, 3) and empty.dtype == np.int64

    total = group.allreduce_sum(3)
    assert total == 3 and type(total) is int
    mean_loss = group.allreduce_sum(0.5)
    assert mean_loss == 0.5 and type(mean_loss) is float
    steps = group.allreduce_min(np.int32(12))
    assert steps == 12 and type(steps) is np.int32
    losses = np.array([1.5, -2.0], np.float32)
    maximum = group.allreduce_max(losses)
    np.testing.assert_array_equal(maximum, losses)
    assert maximum.dtype == np.float32

    config = {"seed": 7}
    assert group.broadcast_object(config) is config
    group.barrier()


def test_collectives_reject_what_they_cannot_exchange():
    group = Distributed()
    with pytest.raises(ValueError, match="at least one dimension"):
        group.allgather(np.float32(1.0))
    with pytest.raises(TypeError, match="numeric"):
        group.allgather(np.array(["a", "b"]))
    with pytest.raises(TypeError, match="numeric"):
        group.allreduce_sum(np.array([True, False]))


def test_one_process_variables_and_gradients_are_untouched():
    group = Distributed()
    table = tf.Variable(np.arange(12, dtype=np.float32).reshape(4, 3))
    group.broadcast_variables([table])
    np.testing.assert_array_equal(table.numpy(), np.arange(12).reshape(4, 3))

    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.gather(table, [1, 3, 3]) ** 2)
    assert group.gradient_tape(tape) is tape
    (gradient,) = tape.gradient(loss, [table])
    assert isinstance(gradient, tf.IndexedSlices)

    @tf.function
    def averaged(sparse_as_dense):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.gather(table, [1, 3, 3]) ** 2)
        return group.average_gradients(tape.gradient(loss, [table]), sparse_as_dense)

    expected = np.zeros([4, 3], np.float32)
    expected[1] = 2 * table.numpy()[1]
    expected[3] = 2 * 2 * table.numpy()[3]
    (sparse,) = averaged(False)
    assert isinstance(sparse, tf.IndexedSlices)
    np.testing.assert_allclose(tf.convert_to_tensor(sparse).numpy(), expected)
    (dense,) = averaged(True)
    assert not isinstance(dense, tf.IndexedSlices)
    np.testing.assert_allclose(dense.numpy(), expected)
    assert group.average_gradients([None]) == [None]


# -- Horovod ----------------------------------------------------------------------------------

def run_in_new_session(command, timeout, **kwargs):
    """Run ``command``; on timeout kill its whole process group (the ranks too) and fail."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    for name in LAUNCHER_SIZE_VARIABLES:
        env.pop(name, None)
    process = subprocess.Popen([str(part) for part in command], env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True, **kwargs)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{command} still running after {timeout} s:\n{output[-3000:]}")
    return process.returncode, output


def horovodrun_two_ranks(outdir: Path, mode: str, timeout: float):
    command = [HOROVODRUN, "-np", "2", "-H", "localhost:2", "--gloo",
               sys.executable, WORKER, outdir, mode]
    return run_in_new_session(command, timeout, cwd=outdir)


@needs_horovodrun
def test_horovod_on_one_process_without_launcher(tmp_path):
    script = textwrap.dedent(f"""
        import json, os
        import numpy as np
        import sim_merlin
        from sim_merlin.training.distributed import Distributed
        group = Distributed.create(use_horovod=True, timeout_seconds=17)
        labels = np.array([1, 0, 1], np.int64)
        print(json.dumps({{
            "enabled": group.enabled, "rank": group.rank, "size": group.size,
            "timeout": os.environ[{GLOO_TIMEOUT_VARIABLE!r}],
            "gathered": group.allgather(labels).tolist(),
            "gathered_dtype": str(group.allgather(labels).dtype),
            "empty_shape": list(group.allgather(np.zeros([0, 2], np.float32)).shape),
            "sum": group.allreduce_sum(2.5), "min": group.allreduce_min(4),
            "object": group.broadcast_object({{"seed": 3}}),
        }}))
    """)
    returncode, output = run_in_new_session([sys.executable, "-c", script], timeout=120,
                                            cwd=tmp_path)
    assert returncode == 0, output[-3000:]
    result = json.loads(output.strip().splitlines()[-1])
    assert result == {"enabled": True, "rank": 0, "size": 1, "timeout": "17",
                      "gathered": [1, 0, 1], "gathered_dtype": "int64", "empty_shape": [0, 2],
                      "sum": 2.5, "min": 4, "object": {"seed": 3}}


def array(record):
    return np.array(record["values"], dtype=record["dtype"]).reshape(record["shape"])


@needs_horovodrun
def test_two_horovod_processes_agree_with_numpy(tmp_path):
    returncode, output = horovodrun_two_ranks(tmp_path, "collectives", timeout=300)
    assert returncode == 0, output[-5000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank, record in enumerate(ranks):
        assert (record["rank"], record["size"], record["local_rank"]) == (rank, 2, rank)
        assert record["enabled"] and record["is_chief"] == (rank == 0)
        assert record["gloo_timeout"] == "120"

    # allgather: the numpy concatenation in rank order, dtype kept, zero-row ranks included
    for name in ranks[0]["allgather_inputs"]:
        inputs = [array(record["allgather_inputs"][name]) for record in ranks]
        expected = np.concatenate(inputs)
        for record in ranks:
            gathered = array(record["allgathered"][name])
            assert gathered.dtype == expected.dtype and gathered.shape == expected.shape
            np.testing.assert_array_equal(gathered, expected)
    assert [array(r["allgather_inputs"]["scores"]).shape[0] for r in ranks] == [5, 0]

    # reductions
    inputs = [record["reduce_inputs"] for record in ranks]
    losses = [array(i["losses"]) for i in inputs]
    for record in ranks:
        reduced = record["reduced"]
        assert reduced["min_steps"] == min(i["steps"] for i in inputs) == 5
        assert reduced["max_steps"] == max(i["steps"] for i in inputs) == 7
        assert reduced["count_sum"] == sum(i["count"] for i in inputs)
        assert reduced["count_sum_type"] == "int"
        np.testing.assert_allclose(array(reduced["losses_sum"]), losses[0] + losses[1],
                                   rtol=1e-6)
        assert reduced["losses_sum"]["dtype"] == "float32"
        assert reduced["losses_max_scalar"] == max(losses[0][0], losses[1][0])
        assert reduced["losses_max_scalar_type"] == "float32"
        assert record["object"] == {"run_id": "run-from-rank-0", "seed": 1234}

    # barrier: rank 0 left only after rank 1 (one second late) arrived
    assert ranks[1]["arrived_at_barrier"] - ranks[0]["arrived_at_barrier"] > 0.5
    assert ranks[0]["left_barrier"] >= ranks[1]["arrived_at_barrier"]

    # broadcast_variables: different initial weights, then rank 0's everywhere
    before = [[array(w) for w in record["weights_before_broadcast"]] for record in ranks]
    assert not np.allclose(before[0][0], before[1][0])
    for record in ranks:
        for weight, root_weight in zip(record["weights_after_broadcast"], before[0]):
            np.testing.assert_array_equal(array(weight), root_weight)

    # gradients: the mean of both ranks' local gradients; embedding gradients stay sparse
    local = [[array(g["dense"]) for g in record["local_gradients"]] for record in ranks]
    expected_mean = [(g0 + g1) / 2 for g0, g1 in zip(*local)]
    assert not np.allclose(local[0][0], local[1][0])  # the ranks really differ
    local_indices = [record["local_gradients"][0]["indices"] for record in ranks]
    for record in ranks:
        for key in ("tape_gradients", "tape_gradients_dense", "average_gradients"):
            for gradient, expected in zip(record[key], expected_mean):
                np.testing.assert_allclose(array(gradient["dense"]), expected,
                                           rtol=1e-5, atol=1e-6, err_msg=key)
        for key in ("tape_gradients", "average_gradients"):
            embedding = record[key][0]
            assert embedding["type"] == "IndexedSlices", key
            assert embedding["indices"] == local_indices[0] + local_indices[1]  # allgathered
        assert record["tape_gradients_dense"][0]["type"] != "IndexedSlices"

    # one SGD step with the averaged gradients keeps the ranks identical
    for record in ranks:
        for weight, start, gradient in zip(record["weights_after_step"], before[0],
                                           expected_mean):
            np.testing.assert_allclose(array(weight), start - 0.1 * gradient,
                                       rtol=1e-5, atol=1e-6)


@needs_horovodrun
def test_a_dying_rank_ends_the_job_instead_of_hanging(tmp_path):
    started = time.monotonic()
    returncode, output = horovodrun_two_ranks(tmp_path, "die", timeout=120)
    elapsed = time.monotonic() - started
    assert returncode != 0, output[-3000:]
    assert elapsed < 120
    assert not list(tmp_path.glob("rank*.json"))  # rank 0's collective never completed
