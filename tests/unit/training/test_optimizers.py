"""``build_optimizer`` and ``LazyAdam`` against independent numpy implementations."""
import math

import numpy as np
import pytest

import sim_merlin  # noqa: F401  (before tensorflow)
import tensorflow as tf

from sim_merlin.kernels import adam as fused_adam
from sim_merlin.training.optimizers import OPTIMIZERS, LazyAdam, build_optimizer

BETA_1, BETA_2, EPSILON = 0.9, 0.999, 1e-7


# ---------------------------------------------------------------- numpy references


class NumpyAdam:
    """Adam in TensorFlow's epsilon-hat form, float64, over a dense array."""

    def __init__(self, weights, lr, weight_decay=0.0):
        self.w = np.array(weights, np.float64)
        self.m = np.zeros_like(self.w)
        self.v = np.zeros_like(self.w)
        self.lr, self.weight_decay, self.t = lr, weight_decay, 0

    def step(self, gradient):
        self.t += 1
        g = np.asarray(gradient, np.float64)
        self.w = self.w - self.weight_decay * self.w  # decoupled, not scaled by lr
        self.m = BETA_1 * self.m + (1 - BETA_1) * g
        self.v = BETA_2 * self.v + (1 - BETA_2) * g * g
        alpha = self.lr * math.sqrt(1 - BETA_2 ** self.t) / (1 - BETA_1 ** self.t)
        self.w = self.w - alpha * self.m / (np.sqrt(self.v) + EPSILON)


class NumpyLazyAdam(NumpyAdam):
    """tfa.optimizers.LazyAdam: only the rows in the batch; global-step bias correction."""

    def sparse_step(self, values, indices):
        self.t += 1
        rows = np.unique(indices)
        g = np.zeros((len(rows),) + self.w.shape[1:])
        for value, index in zip(np.asarray(values, np.float64), indices):
            g[np.searchsorted(rows, index)] += value  # duplicates are summed
        self.m[rows] = BETA_1 * self.m[rows] + (1 - BETA_1) * g
        self.v[rows] = BETA_2 * self.v[rows] + (1 - BETA_2) * g * g
        alpha = self.lr * math.sqrt(1 - BETA_2 ** self.t) / (1 - BETA_1 ** self.t)
        self.w[rows] -= alpha * self.m[rows] / (np.sqrt(self.v[rows]) + EPSILON)


def densify(values, indices, rows):
    dense = np.zeros((rows,) + np.shape(values)[1:])
    np.add.at(dense, np.asarray(indices), np.asarray(values, np.float64))
    return dense


def sparse(values, indices, rows):
    values = np.asarray(values, np.float32)
    return tf.IndexedSlices(tf.constant(values), tf.constant(indices, tf.int64),
                            tf.constant([rows, values.shape[1]], tf.int64))


def slot(optimizer, variable, name):
    """The optimizer's ``m`` or ``v`` slot of ``variable`` (found by name, not by its code)."""
    wanted = [name, variable.name]  # named [<optimizer scope>/]m/<variable name>
    matches = [v for v in optimizer.variables if v.name.split("/")[-2:] == wanted]
    assert len(matches) == 1, [v.name for v in optimizer.variables]
    return matches[0].numpy()


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(params=["fused", "tensorflow"])
def sparse_update(request, monkeypatch):
    """Each LazyAdam sparse-gradient test runs with the fused op (sim_merlin.kernels.adam) and
    with the plain TensorFlow ops it replaces."""
    if request.param == "fused":
        assert fused_adam.available(), "the fused kernels did not build"
    else:
        monkeypatch.setattr(fused_adam, "available", lambda: False)
    return request.param


# A schedule of sparse batches over a 7-row table: duplicates, untouched rows, rows that come
# back after a gap (row 5 only in the first and last step, row 6 never).
SPARSE_STEPS = [[1, 3, 3, 0], [1], [4, 1, 4, 4], [2, 0], [5, 3, 1]]
TABLE_ROWS = 7


def sparse_schedule(rng, dim=3):
    return [(rng.normal(size=(len(indices), dim)) * rng.choice([1e-7, 1e-3, 1.0, 10.0]), indices)
            for indices in SPARSE_STEPS + [[5]]]


# ---------------------------------------------------------------- adam


def test_adam_dense_variable_matches_numpy(rng):
    start = rng.normal(size=(4, 3))
    variable = tf.Variable(start, dtype=tf.float32)
    optimizer = build_optimizer("adam", learning_rate=0.05)
    reference = NumpyAdam(start, 0.05)
    # Gradient scales from 1e-8 (where epsilon dominates) to 100.
    for scale in (1.0, 1e-8, 100.0, 1e-3, 1.0, 0.2):
        gradient = rng.normal(size=start.shape) * scale
        optimizer.apply_gradients([(tf.constant(gradient, tf.float32), variable)])
        reference.step(gradient.astype(np.float32))
        np.testing.assert_allclose(variable.numpy(), reference.w, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(slot(optimizer, variable, "m"), reference.m, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(slot(optimizer, variable, "v"), reference.v, rtol=1e-4, atol=1e-12)
    assert int(optimizer.iterations) == 6


def test_adam_sparse_gradients_equal_dense_adam_on_the_densified_gradient(rng):
    """The reference (Horovod ``sparse_as_dense``) sees dense gradients: the moments of the whole
    table decay every step, and duplicate indices add up before squaring."""
    start = rng.normal(size=(TABLE_ROWS, 3))
    table = tf.Variable(start, dtype=tf.float32, name="sparse_table")
    twin = tf.Variable(start, dtype=tf.float32, name="dense_twin")
    optimizer = build_optimizer("adam", learning_rate=0.01)
    dense_optimizer = build_optimizer("adam", learning_rate=0.01)
    reference = NumpyAdam(start, 0.01)
    for values, indices in sparse_schedule(rng):
        values = np.asarray(values, np.float32)
        optimizer.apply_gradients([(sparse(values, indices, TABLE_ROWS), table)])
        dense = densify(values, indices, TABLE_ROWS)
        dense_optimizer.apply_gradients([(tf.constant(dense, tf.float32), twin)])
        reference.step(dense)
        np.testing.assert_allclose(table.numpy(), reference.w, rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(table.numpy(), twin.numpy(), rtol=1e-5, atol=1e-6)
    # Row 6 never had a gradient: Adam leaves it alone; every other row moved.
    np.testing.assert_array_equal(table.numpy()[6], start[6].astype(np.float32))
    assert (np.abs(table.numpy()[:6] - start[:6]) > 1e-4).all()
    np.testing.assert_allclose(slot(optimizer, table, "v"), reference.v, rtol=1e-4, atol=1e-14)


def test_adam_weight_decay_is_decoupled_and_not_scaled_by_the_learning_rate(rng):
    start = rng.normal(size=(3, 2))
    variable = tf.Variable(start, dtype=tf.float32)
    optimizer = build_optimizer("adam", learning_rate=0.001, weight_decay=0.05)
    reference = NumpyAdam(start, 0.001, weight_decay=0.05)
    for _ in range(4):
        gradient = rng.normal(size=start.shape)
        optimizer.apply_gradients([(tf.constant(gradient, tf.float32), variable)])
        reference.step(gradient)
    np.testing.assert_allclose(variable.numpy(), reference.w, rtol=1e-5, atol=1e-6)
    # The decay dominates here: after 4 steps the weights shrank by about (1 - 0.05)^4.
    assert np.abs(variable.numpy()).sum() < 0.9 * np.abs(start).sum()


# ---------------------------------------------------------------- lazy adam


def test_lazy_adam_updates_only_the_rows_in_the_batch(rng, sparse_update):
    start = rng.normal(size=(TABLE_ROWS, 3))
    table = tf.Variable(start, dtype=tf.float32, name="lazy_table")
    optimizer = build_optimizer("lazy_adam", learning_rate=0.02)
    assert isinstance(optimizer, LazyAdam)
    reference = NumpyLazyAdam(start, 0.02)
    schedule = sparse_schedule(rng)
    optimizer.build([table])
    for values, indices in schedule:
        before = [table.numpy(), slot(optimizer, table, "m"), slot(optimizer, table, "v")]
        optimizer.apply_gradients([(sparse(values, indices, TABLE_ROWS), table)])
        reference.sparse_step(np.asarray(values, np.float32), indices)
        after = [table.numpy(), slot(optimizer, table, "m"), slot(optimizer, table, "v")]
        untouched = sorted(set(range(TABLE_ROWS)) - set(indices))
        touched = sorted(set(indices))
        # Rows not in the batch keep their weights and moments bit for bit; the others change.
        for old, new in zip(before, after):
            np.testing.assert_array_equal(new[untouched], old[untouched])
            assert (new[touched] != old[touched]).any(axis=1).all()
        # Touched rows follow Adam with the global step's bias correction.
        np.testing.assert_allclose(after[0], reference.w, rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(after[1], reference.m, rtol=1e-4, atol=1e-12)
        np.testing.assert_allclose(after[2], reference.v, rtol=1e-4, atol=1e-18)
    np.testing.assert_array_equal(table.numpy()[6], start[6].astype(np.float32))
    np.testing.assert_array_equal(slot(optimizer, table, "m")[6], 0.0)
    # Not the same arithmetic as Adam: a row's moments did not decay while it was absent.
    adam = NumpyAdam(start, 0.02)
    for values, indices in schedule:
        adam.step(densify(values, indices, TABLE_ROWS))
    assert not np.allclose(adam.w, reference.w, rtol=1e-3)


def test_lazy_adam_sums_duplicate_indices(sparse_update):
    values = np.array([[1.0, -2.0], [0.5, 4.0], [3.0, 1.0]], np.float32)
    duplicated = tf.Variable(np.ones((4, 2), np.float32))
    summed = tf.Variable(np.ones((4, 2), np.float32))
    first, second = build_optimizer("lazy_adam", 0.1), build_optimizer("lazy_adam", 0.1)
    for _ in range(3):
        first.apply_gradients([(sparse(values, [2, 2, 0], 4), duplicated)])
        second.apply_gradients([(sparse([values[0] + values[1], values[2]], [2, 0], 4), summed)])
    np.testing.assert_allclose(duplicated.numpy(), summed.numpy(), rtol=1e-6)
    reference = NumpyLazyAdam(np.ones((4, 2)), 0.1)
    for _ in range(3):
        reference.sparse_step(values, [2, 2, 0])
    np.testing.assert_allclose(duplicated.numpy(), reference.w, rtol=1e-5)
    # Adding [0.5, 4.0] to row 2's [1, -2] flips the second component's sign: a per-duplicate
    # (unsummed) update would have moved it the other way.
    assert duplicated.numpy()[2, 1] < 1.0


def test_lazy_adam_bias_correction_uses_the_global_step(sparse_update):
    """A row first touched at step 4 moves by lr * sqrt(1 - b2^4) / (1 - b1^4) * m / sqrt(v),
    not by the step-1 amount lr."""
    table = tf.Variable(np.zeros((3, 1), np.float32))
    optimizer = build_optimizer("lazy_adam", learning_rate=0.1)
    for _ in range(3):
        optimizer.apply_gradients([(sparse([[1.0]], [0], 3), table)])
    optimizer.apply_gradients([(sparse([[1.0]], [2], 3), table)])
    m, v = (1 - BETA_1), (1 - BETA_2)
    expected = -0.1 * math.sqrt(1 - BETA_2 ** 4) / (1 - BETA_1 ** 4) * m / (math.sqrt(v) + EPSILON)
    assert table.numpy()[2, 0] == pytest.approx(expected, rel=1e-5)
    assert abs(expected) < 0.07  # a local-step correction would move it by about lr = 0.1
    assert table.numpy()[1, 0] == 0.0


def test_lazy_adam_dense_gradients_are_plain_adam(rng):
    start = rng.normal(size=(3, 3))
    variable = tf.Variable(start, dtype=tf.float32)
    optimizer = build_optimizer("lazy_adam", learning_rate=0.03)
    reference = NumpyAdam(start, 0.03)
    for _ in range(4):
        gradient = rng.normal(size=start.shape)
        optimizer.apply_gradients([(tf.constant(gradient, tf.float32), variable)])
        reference.step(gradient)
    np.testing.assert_allclose(variable.numpy(), reference.w, rtol=2e-5, atol=1e-6)


def test_lazy_adam_ignores_weight_decay(rng):
    start = rng.normal(size=(5, 2))
    decayed = tf.Variable(start, dtype=tf.float32)
    plain = tf.Variable(start, dtype=tf.float32)
    with_decay = build_optimizer("lazy_adam", 0.01, weight_decay=0.3)
    without = build_optimizer("lazy_adam", 0.01)
    for _ in range(2):
        with_decay.apply_gradients([(sparse([[1.0, 1.0]], [1], 5), decayed)])
        without.apply_gradients([(sparse([[1.0, 1.0]], [1], 5), plain)])
    np.testing.assert_array_equal(decayed.numpy(), plain.numpy())


def test_lazy_adam_round_trips_through_keras_serialization():
    optimizer = build_optimizer("lazy_adam", learning_rate=0.25)
    restored = tf.keras.optimizers.deserialize(tf.keras.optimizers.serialize(optimizer))
    assert type(restored) is LazyAdam
    assert float(restored.learning_rate) == pytest.approx(0.25)
    assert restored.epsilon == pytest.approx(EPSILON)


def test_lazy_adam_docstring_example():
    table = tf.Variable([[1.0], [1.0], [1.0]])
    build_optimizer("lazy_adam", learning_rate=0.1).apply_gradients(
        [(tf.IndexedSlices(tf.constant([[1.0]]), tf.constant([1])), table)])
    np.testing.assert_allclose(table.numpy().ravel(), [1.0, 0.9, 1.0], rtol=1e-5)


# ---------------------------------------------------------------- sgd


def test_sgd_is_plain_gradient_descent(rng):
    start = rng.normal(size=(3, 2))
    variable = tf.Variable(start, dtype=tf.float32)
    optimizer = build_optimizer("sgd", learning_rate=0.1)
    expected = start.copy()
    for _ in range(3):  # no momentum: each step only depends on its own gradient
        gradient = rng.normal(size=start.shape)
        optimizer.apply_gradients([(tf.constant(gradient, tf.float32), variable)])
        expected -= 0.1 * gradient
    np.testing.assert_allclose(variable.numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gradient_kind", ["dense", "sparse"])
def test_sgd_weight_decay_like_addons_sgdw(rng, gradient_kind):
    """``var -= lr * g + weight_decay * var``: the decay is not multiplied by the learning rate,
    and covers the whole variable even when the gradient is sparse."""
    lr, weight_decay = 0.02, 0.1
    start = rng.normal(size=(TABLE_ROWS, 2))
    variable = tf.Variable(start, dtype=tf.float32)
    optimizer = build_optimizer("sgd", learning_rate=lr, weight_decay=weight_decay)
    expected = start.copy()
    for values, indices in sparse_schedule(rng, dim=2)[:4]:
        if gradient_kind == "sparse":
            gradient = sparse(values, indices, TABLE_ROWS)
        else:
            gradient = tf.constant(densify(values, indices, TABLE_ROWS), tf.float32)
        optimizer.apply_gradients([(gradient, variable)])
        expected = expected - lr * densify(np.float32(values), indices, TABLE_ROWS) \
            - weight_decay * expected
    np.testing.assert_allclose(variable.numpy(), expected, rtol=1e-5, atol=1e-6)
    # Row 6 never had a gradient, yet decayed by (1 - weight_decay) per step.
    np.testing.assert_allclose(variable.numpy()[6], start[6] * 0.9 ** 4, rtol=1e-5)


# ---------------------------------------------------------------- validation


def test_build_optimizer_types_and_hyperparameters():
    adam = build_optimizer("adam", learning_rate=0.003)
    assert isinstance(adam, tf.keras.optimizers.Adam)  # ours: same slots, fused update
    assert (adam.beta_1, adam.beta_2, adam.epsilon) == (BETA_1, BETA_2, EPSILON)
    assert float(adam.learning_rate) == pytest.approx(0.003)
    assert adam.weight_decay is None
    sgd = build_optimizer("sgd", learning_rate=0.5)
    assert isinstance(sgd, tf.keras.optimizers.SGD)
    assert sgd.momentum == 0.0 and not sgd.nesterov
    assert set(OPTIMIZERS) == {"adam", "lazy_adam", "sgd"}


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="adamw"), "--optimizer"),
    (dict(name="Adam"), "--optimizer"),
    (dict(name="adam", learning_rate=0.0), "--lr"),
    (dict(name="sgd", learning_rate=-0.1), "--lr"),
    (dict(name="adam", learning_rate=float("nan")), "--lr"),
    (dict(name="adam", learning_rate=float("inf")), "--lr"),
    (dict(name="adam", weight_decay=-1e-4), "--weight_decay"),
    (dict(name="sgd", weight_decay=float("nan")), "--weight_decay"),
    (dict(name="lazy_adam", weight_decay=float("inf")), "--weight_decay"),
])
def test_build_optimizer_rejects_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_optimizer(**kwargs)


def test_adam_updates_mixed_precision_variables_and_matches_keras_adam(rng):
    """Under a mixed policy a layer's weights are AutoCastVariables: the fused update must reach
    the float32 variable underneath, and give Keras Adam's result."""
    start = rng.normal(size=(5, 3)).astype(np.float32)
    tf.keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        layer = tf.keras.layers.Dense(3, use_bias=False)
        layer.build([None, 5])
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")
    layer.kernel.assign(start)
    twin = tf.Variable(start)
    ours, keras = build_optimizer("adam", 0.01), tf.keras.optimizers.Adam(0.01, epsilon=1e-7)
    for _ in range(3):
        gradient = tf.constant(rng.normal(size=(5, 3)).astype(np.float32))
        ours.apply_gradients([(gradient, layer.kernel)])
        keras.apply_gradients([(gradient, twin)])
    assert layer.kernel.dtype == tf.float32
    np.testing.assert_allclose(layer.kernel.numpy(), twin.numpy(), rtol=1e-6, atol=1e-7)
    assert not np.allclose(layer.kernel.numpy(), start)


def test_lazy_adam_sparse_updates_run_as_one_fused_op():
    table = tf.Variable(np.zeros((5, 2), np.float32))
    optimizer = build_optimizer("lazy_adam", 0.1)
    optimizer.build([table])

    @tf.function
    def step(values, indices):
        optimizer.apply_gradients([(tf.IndexedSlices(values, indices, tf.constant([5, 2])),
                                    table)])

    graph = step.get_concrete_function(tf.TensorSpec([None, 2]), tf.TensorSpec([None], tf.int32))
    ops = {node.type for node in graph.graph.get_operations()}
    assert "SimMerlinLazyAdam" in ops
    assert not ops & {"UnsortedSegmentSum", "Unique", "ResourceScatterUpdate"}


def test_fused_lazy_adam_names_an_index_outside_the_table():
    table = tf.Variable(np.zeros((5, 2), np.float32))
    optimizer = build_optimizer("lazy_adam", 0.1)
    with pytest.raises(tf.errors.InvalidArgumentError, match="has index 7, outside the table's 5"):
        optimizer.apply_gradients([(sparse([[1.0, 1.0], [2.0, 2.0]], [1, 7], 5), table)])
