"""The deferred dense Adam ops (deferred_adam.cc) against TensorFlow's dense ``ResourceApplyAdam``:
after any mix of sparse updates, catch-ups of some rows and a final catch-up of all rows, the
weights and both moments are the same bits; plus row/shape errors and the own-thread path."""
import numpy as np
import pytest

import sim_merlin  # noqa: F401  (before tensorflow)
import tensorflow as tf

from sim_merlin.kernels import adam

pytestmark = [pytest.mark.compat_lock,
              pytest.mark.skipif(not adam.available(), reason="fused kernels not built here")]

LR, BETA_1, BETA_2, EPSILON = 0.01, 0.9, 0.999, 1e-7


def dense_adam_step(variables, gradient, step):
    """TensorFlow's own dense Adam step (the reference's arithmetic)."""
    var, m, v = variables
    t = tf.cast(step, tf.float32)
    tf.raw_ops.ResourceApplyAdam(
        var=var.handle, m=m.handle, v=v.handle, beta1_power=tf.pow(tf.constant(BETA_1), t),
        beta2_power=tf.pow(tf.constant(BETA_2), t), lr=tf.constant(LR),
        beta1=tf.constant(BETA_1), beta2=tf.constant(BETA_2), epsilon=tf.constant(EPSILON),
        grad=gradient)


def table(initial):
    return [tf.Variable(initial), tf.Variable(tf.zeros_like(initial)),
            tf.Variable(tf.zeros_like(initial))]


def schedule(rng, rows, steps, width):
    """Sparse gradients with repeated rows, rows untouched for long stretches, and magnitudes
    from 1e-4 to 30; the later steps touch only a few low rows (long gaps for the rest)."""
    for step in range(1, steps + 1):
        reach = rows if step < steps // 2 else max(2, rows // 6)
        count = int(rng.integers(1, 9))
        indices = rng.integers(0, reach, count)
        scale = np.float32(rng.choice([1e-4, 1.0, 30.0]))
        values = (rng.normal(size=(count, width)) * scale).astype(np.float32)
        yield step, indices, values


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("width", [16, 5, 48])
def test_deferred_adam_gives_the_bits_of_dense_adam(index_dtype, width):
    rng = np.random.default_rng(7)
    rows = 40
    initial = (rng.normal(size=(rows, width)) * 0.1).astype(np.float32)
    dense, deferred = table(initial), table(initial)
    steps = tf.Variable(tf.zeros([rows], tf.int32))
    for step, indices, values in schedule(rng, rows, 240, width):
        dense_adam_step(dense, tf.math.unsorted_segment_sum(values, indices, rows), step)
        if step % 5 == 0:  # a read of some rows (repeats included) before the step's update
            read = rng.integers(0, rows, 6).astype(index_dtype)
            adam.catch_up(*deferred, steps, [tf.constant(read[:3]), tf.constant(read[3:])],
                          LR, BETA_1, BETA_2, EPSILON, step - 1)
            assert all(steps.numpy()[read] == step - 1)
        adam.deferred_update(*deferred, steps,
                             tf.IndexedSlices(tf.constant(values),
                                              tf.constant(indices.astype(index_dtype))),
                             LR, BETA_1, BETA_2, EPSILON, step)
        touched = np.unique(indices)
        assert all(steps.numpy()[touched] == step)
        # The rows just updated are up to date: the same bits as dense Adam's.
        np.testing.assert_array_equal(deferred[0].numpy()[touched], dense[0].numpy()[touched])
    behind = np.flatnonzero(steps.numpy() < 240)
    assert len(behind) > rows // 2  # the test does exercise long gaps
    # Untouched rows do move under dense Adam (their moments are not zero): the deferred table
    # differs until it catches up.
    assert not np.array_equal(deferred[0].numpy()[behind], dense[0].numpy()[behind])
    adam.catch_up(*deferred, steps, tf.range(rows), LR, BETA_1, BETA_2, EPSILON, 240)
    for name, mine, theirs in zip(("weights", "m", "v"), deferred, dense):
        np.testing.assert_array_equal(mine.numpy(), theirs.numpy(), err_msg=name)
    assert all(steps.numpy() == 240)


@pytest.mark.parametrize("width", [16, 32, 7])
def test_a_catch_up_through_vanishing_moments_gives_the_bits_of_dense_adam(width):
    """Rows whose m reaches zero (then only v decays) or starts there, a row whose v vanishes
    too, a NaN and negative zeros: 200 zero-gradient steps, against dense Adam's."""
    rng = np.random.default_rng(3)
    rows = 6
    initial = rng.normal(size=(rows, width)).astype(np.float32)
    m = (rng.normal(size=(rows, width)) * 1e-3).astype(np.float32)
    v = (rng.uniform(size=(rows, width)) * 1e-4).astype(np.float32)
    m[0] = 0.0                  # m zero from the start: only v decays
    m[1] = 1e-36                # m vanishes part way (denormal, then zero)
    m[2, ::2] = -0.0            # negative zeros among live elements
    m[3, 1] = np.nan            # a NaN keeps the row moving
    v[4] = 2e-38                # v vanishes too
    m[4] = 1e-37
    initial[5, ::3] = -0.0
    dense, deferred = table(initial), table(initial)
    for variables in (dense, deferred):
        variables[1].assign(m)
        variables[2].assign(v)
    steps = tf.Variable(tf.zeros([rows], tf.int32))
    zeros = tf.zeros([rows, width])
    for step in range(1, 201):
        dense_adam_step(dense, zeros, step)
    adam.catch_up(*deferred, steps, tf.constant([5, 0, 3, 1, 2, 4, 0]), LR, BETA_1, BETA_2,
                  EPSILON, 200)
    for name, mine, theirs in zip(("weights", "m", "v"), deferred, dense):
        np.testing.assert_array_equal(mine.numpy().view(np.uint32),
                                      theirs.numpy().view(np.uint32), err_msg=name)
    assert not np.array_equal(deferred[0].numpy()[2:], initial[2:])  # the steps did move rows


def test_a_row_never_touched_stays_and_its_catch_up_is_free():
    initial = np.arange(12, dtype=np.float32).reshape(4, 3)
    variables = table(initial)
    steps = tf.Variable(tf.zeros([4], tf.int32))
    adam.catch_up(*variables, steps, tf.constant([0, 3, 3]), LR, BETA_1, BETA_2, EPSILON, 50)
    np.testing.assert_array_equal(variables[0].numpy(), initial)
    assert list(steps.numpy()) == [50, 0, 0, 50]


def test_repeated_rows_are_summed_as_unsorted_segment_sum_does():
    rng = np.random.default_rng(3)
    initial = rng.normal(size=(6, 4)).astype(np.float32)
    dense, deferred = table(initial), table(initial)
    steps = tf.Variable(tf.zeros([6], tf.int32))
    indices = np.array([2, 5, 2, 2, 0, 5])
    values = rng.normal(size=(6, 4)).astype(np.float32) * 1000
    dense_adam_step(dense, tf.math.unsorted_segment_sum(values, indices, 6), 1)
    adam.deferred_update(*deferred, steps, tf.IndexedSlices(values, indices), LR, BETA_1,
                         BETA_2, EPSILON, 1)
    adam.catch_up(*deferred, steps, tf.range(6), LR, BETA_1, BETA_2, EPSILON, 1)
    for mine, theirs in zip(deferred, dense):
        np.testing.assert_array_equal(mine.numpy(), theirs.numpy())


def test_rows_outside_the_table_and_rows_ahead_are_named():
    variables = table(np.zeros([4, 2], np.float32))
    steps = tf.Variable(tf.zeros([4], tf.int32))
    with pytest.raises(tf.errors.InvalidArgumentError, match="index 1 is 9, outside .* 4 rows"):
        adam.catch_up(*variables, steps, tf.constant([1, 9]), LR, BETA_1, BETA_2, EPSILON, 1)
    with pytest.raises(tf.errors.InvalidArgumentError, match="outside the table's 4 rows"):
        adam.deferred_update(*variables, steps, tf.IndexedSlices(tf.ones([1, 2]),
                                                                 tf.constant([-1])),
                             LR, BETA_1, BETA_2, EPSILON, 1)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"values must be \[1, 2\]|\[N, 2\]"):
        adam.deferred_update(*variables, steps, tf.IndexedSlices(tf.ones([1, 3]),
                                                                 tf.constant([0])),
                             LR, BETA_1, BETA_2, EPSILON, 1)
    adam.deferred_update(*variables, steps, tf.IndexedSlices(tf.ones([1, 2]), tf.constant([2])),
                         LR, BETA_1, BETA_2, EPSILON, 3)
    with pytest.raises(tf.errors.FailedPreconditionError, match="row 2 has had 3 Adam steps"):
        adam.catch_up(*variables, steps, tf.constant([2]), LR, BETA_1, BETA_2, EPSILON, 2)
    with pytest.raises(tf.errors.InvalidArgumentError, match="steps a vector"):
        adam.catch_up(*variables, tf.Variable(tf.zeros([3], tf.int32)), tf.constant([0]), LR,
                      BETA_1, BETA_2, EPSILON, 1)


@pytest.mark.parametrize("looked_up_first", [False, True])
def test_updates_in_place_never_change_a_value_read_before_them(looked_up_first):
    # The ops update the tables in place (no copy of the table per step, which TensorFlow's
    # dense path makes once a gather has put the table in copy-on-read mode); a value read
    # densely before the update keeps its numbers, whether the read shares the table's buffer
    # (not yet looked up: the update copies first) or copied it (copy-on-read mode).
    from sim_merlin.kernels import embedding_rows

    initial = np.arange(24, dtype=np.float32).reshape(6, 4) / 10
    variables = table(initial)
    steps = tf.Variable(tf.zeros([6], tf.int32))
    if looked_up_first:
        embedding_rows.embedding_rows([variables[0]], [tf.constant([1, 2])])
    before = [variables[0].value(), variables[1].value()]
    gradient = tf.IndexedSlices(tf.ones([2, 4]), tf.constant([1, 4]))
    adam.deferred_update(*variables, steps, gradient, LR, BETA_1, BETA_2, EPSILON, 1)
    adam.catch_up(*variables, steps, tf.constant([1, 4]), LR, BETA_1, BETA_2, EPSILON, 1)
    adam.lazy_update(*variables, gradient, LR, BETA_1, BETA_2, EPSILON, 2)
    np.testing.assert_array_equal(before[0].numpy(), initial)
    np.testing.assert_array_equal(before[1].numpy(), np.zeros_like(initial))
    after = variables[0].numpy()
    assert not np.array_equal(after[[1, 4]], initial[[1, 4]])
    np.testing.assert_array_equal(np.delete(after, [1, 4], axis=0),
                                  np.delete(initial, [1, 4], axis=0))


def test_own_threads_give_the_bits_of_dense_adam(run_with_one_intra_op_thread):
    """With a one-thread intra-op pool the ops split the rows over threads of their own (rows
    by residue); the result is still dense Adam's, bit for bit."""
    output = run_with_one_intra_op_thread("""
from sim_merlin.kernels import adam
rng = np.random.default_rng(11)
rows, width = 1000, 16
initial = rng.normal(size=(rows, width)).astype(np.float32)
def table():
    return [tf.Variable(initial)] + [tf.Variable(tf.zeros_like(initial)) for _ in range(2)]
dense, deferred = table(), table()
steps = tf.Variable(tf.zeros([rows], tf.int32))
for step in range(1, 31):
    indices = rng.integers(0, rows, 300)
    values = rng.normal(size=(300, width)).astype(np.float32)
    t = tf.cast(step, tf.float32)
    tf.raw_ops.ResourceApplyAdam(var=dense[0].handle, m=dense[1].handle, v=dense[2].handle,
        beta1_power=tf.pow(tf.constant(0.9), t), beta2_power=tf.pow(tf.constant(0.999), t),
        lr=tf.constant(0.01), beta1=tf.constant(0.9), beta2=tf.constant(0.999),
        epsilon=tf.constant(1e-7), grad=tf.math.unsorted_segment_sum(values, indices, rows))
    adam.catch_up(*deferred, steps, tf.constant(indices[:100]), 0.01, 0.9, 0.999, 1e-7, step - 1)
    adam.deferred_update(*deferred, steps, tf.IndexedSlices(values, indices), 0.01, 0.9, 0.999,
                         1e-7, step)
adam.catch_up(*deferred, steps, tf.range(rows), 0.01, 0.9, 0.999, 1e-7, 30)
print(all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(dense, deferred)))
""")
    assert output.strip().splitlines()[-1] == "True"


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_a_small_table_read_many_times_catches_up_by_marking_its_rows(index_dtype):
    """At least 4 ids per table row (the categories of a long history): the catch-up marks the
    rows read instead of listing them per part. The rows read come up to the step (dense
    Adam's bits), the others keep their count, and a read row ahead is still named."""
    rng = np.random.default_rng(3)
    rows, width = 10, 16
    initial = (rng.normal(size=(rows, width)) * 0.1).astype(np.float32)
    dense, deferred = table(initial), table(initial)
    steps = tf.Variable(tf.zeros([rows], tf.int32))
    for step in range(1, 61):
        indices = rng.integers(0, rows, 3)
        values = rng.normal(size=(3, width)).astype(np.float32)
        dense_adam_step(dense, tf.math.unsorted_segment_sum(values, indices, rows), step)
        if step % 7 == 0:  # 60 reads of rows 0 .. 5 (rows 6 .. 9 not read)
            read = rng.integers(0, 6, 60).astype(index_dtype)
            before = steps.numpy().copy()
            adam.catch_up(*deferred, steps, [tf.constant(read[:25]), tf.constant(read[25:])],
                          LR, BETA_1, BETA_2, EPSILON, step - 1)
            after = steps.numpy()
            assert (after[np.unique(read)] == step - 1).all()
            unread = np.setdiff1d(np.arange(rows), read)
            np.testing.assert_array_equal(after[unread], before[unread])
        adam.deferred_update(*deferred, steps, tf.IndexedSlices(values, indices), LR, BETA_1,
                             BETA_2, EPSILON, step)
    adam.catch_up(*deferred, steps, tf.constant(np.repeat(np.arange(rows), 4)), LR, BETA_1,
                  BETA_2, EPSILON, 60)
    for mine, theirs in zip(deferred, dense):
        np.testing.assert_array_equal(mine.numpy(), theirs.numpy())
    with pytest.raises(tf.errors.FailedPreconditionError, match="has had 60 Adam steps"):
        adam.catch_up(*deferred, steps, tf.constant(np.repeat(np.arange(rows), 4)), LR, BETA_1,
                      BETA_2, EPSILON, 59)


def test_a_row_outside_the_table_is_named_when_the_rows_are_marked():
    variables = table(np.zeros([2, 3], np.float32))
    steps = tf.Variable(tf.zeros([2], tf.int32))
    with pytest.raises(tf.errors.InvalidArgumentError, match="index 6 is 2, outside .* 2 rows"):
        adam.catch_up(*variables, steps, tf.constant([0, 1, 1, 0, 0, 1, 2, 0]), LR, BETA_1,
                      BETA_2, EPSILON, 1)


@pytest.mark.parametrize("width", [16, 5])
def test_bfloat16_gradient_rows_give_the_bits_of_their_float32_values(width):
    # The rows a bfloat16 lookup's gradient gives: widened in the op, summed in float32, the
    # same update as from the float32 rows of the same values.
    rng = np.random.default_rng(11)
    rows = 30
    initial = (rng.normal(size=(rows, width)) * 0.1).astype(np.float32)
    from_half, from_full = table(initial), table(initial)
    steps = [tf.Variable(tf.zeros([rows], tf.int32)) for _ in range(2)]
    for step in range(1, 8):
        indices = tf.constant(rng.integers(0, rows, 50))  # repeats: summed in order
        half = tf.cast(tf.constant(rng.normal(size=(50, width)) * 10, tf.float32), tf.bfloat16)
        adam.deferred_update(*from_half, steps[0], tf.IndexedSlices(half, indices), LR, BETA_1,
                             BETA_2, EPSILON, step)
        adam.deferred_update(*from_full, steps[1], tf.IndexedSlices(
            tf.cast(half, tf.float32), indices), LR, BETA_1, BETA_2, EPSILON, step)
    for name, mine, theirs in zip(("weights", "m", "v"), from_half, from_full):
        np.testing.assert_array_equal(mine.numpy(), theirs.numpy(), err_msg=name)
    assert not np.array_equal(from_half[0].numpy(), initial)
