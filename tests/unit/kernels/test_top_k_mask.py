"""The top-k mask op against numpy (ties by position, NaN last, short rows, k = 0 and k >= length),
its threads, and the search unit's selection on the fused and the plain path."""
import numpy as np
import pytest
import tensorflow as tf

from sim_merlin.kernels import model_ops
from sim_merlin.kernels.top_k_mask import top_k_mask

pytestmark = pytest.mark.compat_lock


def _numpy_top_k_mask(keys, valid, k):
    """Per row: the valid positions ordered by (NaN last, higher key, lower position); first k."""
    out = np.zeros_like(valid)
    for b in range(len(keys)):
        positions = np.flatnonzero(valid[b])
        row = keys[b, positions]
        nan = np.isnan(row)
        order = np.lexsort((positions, -np.where(nan, 0.0, row), nan))
        out[b, positions[order[:k]]] = True
    return out


def _problem(rows, length, seed, ties=False):
    rng = np.random.default_rng(seed)
    keys = rng.normal(size=(rows, length)).astype(np.float32)
    if ties:  # few distinct values: many ties at the k-th place
        keys = rng.integers(0, 4, size=(rows, length)).astype(np.float32)
    valid = rng.uniform(size=(rows, length)) < rng.uniform(0.1, 1.0, size=(rows, 1))
    valid[0] = False  # a row with nothing valid
    return keys, valid


def test_the_op_is_in_the_library():
    assert model_ops.available(), "the fused kernels did not build; see the message above"


@pytest.mark.parametrize("k", [0, 1, 7, 50, 90, 200])
@pytest.mark.parametrize("ties", [False, True])
def test_matches_numpy(k, ties):
    keys, valid = _problem(300, 90, seed=k + ties, ties=ties)
    got = top_k_mask(tf.constant(keys), tf.constant(valid), k).numpy()
    want = _numpy_top_k_mask(keys, valid, k)
    np.testing.assert_array_equal(got, want)
    assert (got.sum(axis=1) == np.minimum(valid.sum(axis=1), k)).all()
    assert not (got & ~valid).any()


def test_nan_and_infinite_keys_rank_last_and_first():
    keys = np.array([[np.nan, 1.0, -np.inf, np.inf, 0.0, np.nan]], np.float32)
    valid = np.ones_like(keys, bool)
    for k, want in [(1, [3]), (3, [1, 3, 4]), (4, [1, 2, 3, 4]), (5, [0, 1, 2, 3, 4])]:
        got = top_k_mask(tf.constant(keys), tf.constant(valid), k).numpy()
        assert np.flatnonzero(got[0]).tolist() == want, k


def test_bad_shapes_and_k_are_named():
    with pytest.raises(tf.errors.InvalidArgumentError, match="one shape"):
        top_k_mask(tf.zeros([2, 3]), tf.zeros([2, 4], tf.bool), 1)
    with pytest.raises(ValueError, match="k must be >= 0"):
        top_k_mask(tf.zeros([2, 3]), tf.zeros([2, 3], tf.bool), -1)


THREADS_SCRIPT = r"""
rng = np.random.default_rng(0)
keys = tf.constant(rng.integers(0, 5, size=(5000, 90)).astype(np.float32))
valid = tf.constant(rng.uniform(size=(5000, 90)) < 0.7)
one = lib.sim_merlin_top_k_mask(keys, valid, k=50, threads=1).numpy()
three = lib.sim_merlin_top_k_mask(keys, valid, k=50, threads=3).numpy()
assert np.array_equal(one, three), "results depend on the number of threads"
print("identical")
"""


def test_own_threads_give_the_same_result_as_one(run_with_one_intra_op_thread):
    assert "identical" in run_with_one_intra_op_thread(THREADS_SCRIPT)
