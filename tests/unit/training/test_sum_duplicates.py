"""sum_duplicates: the trainer's faster merge of repeated rows in embedding gradients."""
import sim_merlin  # noqa: F401
import numpy as np
import pytest
import tensorflow as tf

from sim_merlin.training.trainer import sum_duplicates


def _slices(dtype, rows=50, n=2000, width=4, seed=0):
    rng = np.random.default_rng(seed)
    indices = tf.constant(rng.integers(0, rows, n), dtype)
    values = tf.constant(rng.normal(size=(n, width)).astype(np.float32))
    return tf.IndexedSlices(values, indices, tf.constant([rows, width], tf.int64))


@pytest.mark.parametrize("dtype", [tf.int32, tf.int64])
def test_same_rows_and_sums_as_keras_own_merge(dtype):
    gradient = _slices(dtype)
    ours = sum_duplicates(gradient, rows=50)
    keras = tf.keras.optimizers.Adam()._deduplicate_sparse_grad([gradient])[0]
    np.testing.assert_array_equal(ours.indices.numpy(), keras.indices.numpy())
    np.testing.assert_array_equal(ours.values.numpy(), keras.values.numpy())  # bitwise
    dense = np.zeros([50, 4], np.float32)
    np.add.at(dense, gradient.indices.numpy(), gradient.values.numpy())
    np.testing.assert_allclose(tf.convert_to_tensor(ours).numpy(), dense, rtol=1e-6, atol=1e-6)


def test_an_adam_step_is_bitwise_the_same():
    gradient = _slices(tf.int64)
    tables = [tf.Variable(tf.ones([50, 4])) for _ in range(2)]
    for table, grad in zip(tables, [gradient, sum_duplicates(gradient, rows=50)]):
        optimizer = tf.keras.optimizers.Adam(0.01)
        for _ in range(3):
            optimizer.apply_gradients([(grad, table)])
    np.testing.assert_array_equal(tables[0].numpy(), tables[1].numpy())


def test_no_rows():
    empty = tf.IndexedSlices(tf.zeros([0, 3]), tf.zeros([0], tf.int64), tf.constant([7, 3], tf.int64))
    merged = sum_duplicates(empty, rows=7)
    assert merged.values.shape.as_list() == [0, 3] and merged.indices.shape.as_list() == [0]
