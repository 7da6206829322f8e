"""The top-k mask op against numpy (ties by position, NaN last, short rows, k = 0 and k >= length),
its threads, and the search unit's selection on the fused and the plain path; the op that computes
soft search's keys itself (dot_top_k_mask) against numpy's inner products, rounded to the
inputs' dtype."""
import numpy as np
import pytest
import tensorflow as tf

from sim_merlin.kernels import model_ops
from sim_merlin.kernels.top_k_mask import dot_top_k_mask, top_k_mask

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


def _bf16(x):
    """float32 values rounded to bfloat16 (nearest even), back as float32."""
    return tf.cast(tf.cast(tf.constant(x, tf.float32), tf.bfloat16), tf.float32).numpy()


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
@pytest.mark.parametrize("width", [1, 16, 20, 32, 33])
@pytest.mark.parametrize("k", [0, 1, 7, 50, 90])
def test_dot_keys_match_numpy_inner_products(dtype, width, k):
    """Small integers: every product and sum is exact in float32 and in bfloat16 (|sum| <= 99
    fits bfloat16's 8 bits), so numpy's float64 inner products are the op's keys exactly, with
    many ties (broken by position)."""
    rng = np.random.default_rng(width * 100 + k)
    rows, length = 200, 90
    query = rng.integers(-1, 2, size=(rows, width)).astype(np.float32)
    history = rng.integers(-3, 4, size=(rows, length, width)).astype(np.float32)
    valid = rng.uniform(size=(rows, length)) < rng.uniform(0.1, 1.0, size=(rows, 1))
    valid[0] = False
    keys = np.einsum("bld,bd->bl", history.astype(np.float64), query.astype(np.float64))
    got = dot_top_k_mask(tf.cast(query, dtype), tf.cast(history, dtype), valid, k).numpy()
    np.testing.assert_array_equal(got, _numpy_top_k_mask(keys, valid, k))


def test_dot_keys_are_rounded_to_the_inputs_dtype():
    """Two steps whose inner products differ by 2^-10: distinct in float32, the same bfloat16
    (1.0): with bfloat16 inputs the tie goes to the lower position, as a bfloat16 product's
    output would rank them; with float32 inputs the larger one wins."""
    query = np.zeros((1, 16), np.float32)
    query[0, :3] = 1.0
    history = np.zeros((1, 3, 16), np.float32)
    history[0, 0, :3] = [0.5, 0.5, 0.0]             # 1.0
    history[0, 1, :3] = [0.5, 0.5, 2.0 ** -10]      # 1.0 + 2^-10, rounded to bfloat16: 1.0
    history[0, 2, :3] = [0.25, 0.25, 0.0]           # 0.5
    assert (_bf16(history) == history).all()        # the inputs themselves are exact
    assert _bf16(1.0 + 2.0 ** -10) == 1.0
    valid = np.ones((1, 3), bool)
    f32 = dot_top_k_mask(tf.constant(query), tf.constant(history), valid, 1).numpy()
    bf16 = dot_top_k_mask(tf.cast(query, tf.bfloat16), tf.cast(history, tf.bfloat16), valid,
                          1).numpy()
    assert np.flatnonzero(f32[0]).tolist() == [1]
    assert np.flatnonzero(bf16[0]).tolist() == [0]


def test_dot_keys_on_random_data_agree_with_the_two_op_path():
    """Normal data in bfloat16: the same selection as ranking TensorFlow's bfloat16 batched
    product (the path it replaces) by top_k_mask, row for row."""
    from sim_merlin.blocks.attention import dot_scores

    rng = np.random.default_rng(5)
    query = tf.cast(rng.normal(size=(512, 32)), tf.bfloat16)
    history = tf.cast(rng.normal(size=(512, 90, 32)), tf.bfloat16)
    valid = tf.constant(rng.uniform(size=(512, 90)) < 0.8)
    want = top_k_mask(tf.cast(dot_scores(query, history), tf.float32), valid, 50).numpy()
    got = dot_top_k_mask(query, history, valid, 50).numpy()
    np.testing.assert_array_equal(got, want)


def test_dot_bad_shapes_and_dtypes_are_named():
    with pytest.raises(tf.errors.InvalidArgumentError, match="query must be"):
        dot_top_k_mask(tf.zeros([2, 4]), tf.zeros([2, 3, 5]), tf.zeros([2, 3], tf.bool), 1)
    with pytest.raises(tf.errors.InvalidArgumentError, match="query must be"):
        dot_top_k_mask(tf.zeros([2, 4]), tf.zeros([2, 3, 4]), tf.zeros([2, 2], tf.bool), 1)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        dot_top_k_mask(tf.zeros([2, 4]), tf.zeros([2, 3, 4], tf.float16),
                       tf.zeros([2, 3], tf.bool), 1)
    with pytest.raises(ValueError, match="k must be >= 0"):
        dot_top_k_mask(tf.zeros([2, 4]), tf.zeros([2, 3, 4]), tf.zeros([2, 3], tf.bool), -1)


DOT_THREADS_SCRIPT = r"""
rng = np.random.default_rng(0)
query = tf.cast(rng.integers(-2, 3, size=(3000, 32)), tf.bfloat16)
history = tf.cast(rng.integers(-2, 3, size=(3000, 90, 32)), tf.bfloat16)
valid = tf.constant(rng.uniform(size=(3000, 90)) < 0.7)
one = lib.sim_merlin_dot_top_k_mask(query, history, valid, k=50, threads=1).numpy()
three = lib.sim_merlin_dot_top_k_mask(query, history, valid, k=50, threads=3).numpy()
assert np.array_equal(one, three), "results depend on the number of threads"
assert (one.sum(axis=1) == np.minimum(valid.numpy().sum(axis=1), 50)).all()
print("identical")
"""


def test_dot_own_threads_give_the_same_result_as_one(run_with_one_intra_op_thread):
    assert "identical" in run_with_one_intra_op_thread(DOT_THREADS_SCRIPT)
