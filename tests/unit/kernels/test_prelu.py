"""The PReLU op against numpy (float32 and bfloat16 rounding, x = 0, trailing-dimension slopes),
its gradient against numpy and TensorFlow's own ops, its threads, and its errors."""
import numpy as np
import pytest
import tensorflow as tf

from sim_merlin.kernels import model_ops
from sim_merlin.kernels.prelu import prelu

pytestmark = pytest.mark.compat_lock


def _as(values, dtype):
    """``values`` (float32) as ``dtype`` would store them, back in float32."""
    return tf.cast(tf.cast(tf.constant(values, tf.float32), dtype), tf.float32).numpy()


def _problem(shape, width_dims, dtype, seed):
    rng = np.random.default_rng(seed)
    x = _as(rng.normal(size=shape).astype(np.float32), dtype)
    x.flat[::7] = 0.0  # exact zeros: value 0 and gradient 0
    alpha = _as(rng.normal(size=shape[-width_dims:]).astype(np.float32) * 0.3, dtype)
    dy = _as(rng.normal(size=shape).astype(np.float32), dtype)
    return x, alpha, dy


def _numpy_prelu(x, alpha, dy, dtype):
    """Forward and gradients with each product rounded to ``dtype`` as TensorFlow's ops do."""
    y = np.where(x > 0, x, np.where(x < 0, _as(alpha * x, dtype), 0.0))
    dx = np.where(x > 0, dy, np.where(x < 0, _as(alpha * dy, dtype), 0.0))
    rows = x.reshape(-1, alpha.size)
    terms = np.where(rows < 0, _as(dy.reshape(rows.shape) * rows, dtype), 0.0)
    dalpha = _as(terms.astype(np.float64).sum(axis=0).astype(np.float32), dtype)
    magnitude = np.abs(terms).astype(np.float64).sum(axis=0)  # bounds the float32 sums' error
    return y, dx, dalpha.reshape(alpha.shape), magnitude.reshape(alpha.shape)


def _fused(x, alpha, dy, dtype):
    xt, at = tf.cast(tf.constant(x), dtype), tf.cast(tf.constant(alpha), dtype)
    with tf.GradientTape() as tape:
        tape.watch([xt, at])
        y = prelu(xt, at)
    dx, dalpha = tape.gradient(y, [xt, at], output_gradients=tf.cast(tf.constant(dy), dtype))
    assert y.dtype == dx.dtype == dalpha.dtype == dtype
    return [tf.cast(t, tf.float32).numpy() for t in (y, dx, dalpha)]


def test_the_op_is_in_the_library():
    assert model_ops.available(), "the fused kernels did not build; see the message above"


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
@pytest.mark.parametrize("shape,width_dims", [((300, 200), 1), ((5000, 80), 1), ((7, 3), 1),
                                              ((6, 4, 5), 2), ((9, 4, 5), 1)])
def test_matches_numpy(dtype, shape, width_dims):
    x, alpha, dy = _problem(shape, width_dims, dtype, seed=sum(shape))
    y, dx, dalpha = _fused(x, alpha, dy, dtype)
    want_y, want_dx, want_dalpha, magnitude = _numpy_prelu(x, alpha, dy, dtype)
    np.testing.assert_array_equal(y, want_y)
    np.testing.assert_array_equal(dx, want_dx)
    assert y.shape == x.shape and dalpha.shape == alpha.shape
    # the slope gradient: float32 sums (in block order) rounded once to the dtype: the exact
    # sum's value up to the float32 sums' error and one rounding to the dtype
    rounding = 2.0 ** -8 if dtype == tf.bfloat16 else 2.0 ** -24
    bound = 1e-5 * magnitude + 2 * rounding * np.abs(want_dalpha)
    assert np.all(np.abs(dalpha - want_dalpha) <= bound)
    assert np.all(y[x == 0] == 0) and not np.any(np.signbit(y[x == 0]))
    assert np.all(dx[x == 0] == 0)


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
def test_equals_keras_prelu_ops_bit_for_bit(dtype):
    """The Keras layer's own ops (relu(x) - alpha relu(-x)) give the same forward values and
    input gradients, bit for bit, and the same slope gradient up to the sums' rounding."""
    x, alpha, dy = _problem((4096, 200), 1, dtype, seed=11)
    xt, at = tf.cast(tf.constant(x), dtype), tf.cast(tf.constant(alpha), dtype)
    with tf.GradientTape() as tape:
        tape.watch([xt, at])
        y = tf.nn.relu(xt) - at * tf.nn.relu(-xt)
    dx, dalpha = tape.gradient(y, [xt, at], output_gradients=tf.cast(tf.constant(dy), dtype))
    got = _fused(x, alpha, dy, dtype)
    np.testing.assert_array_equal(got[0], tf.cast(y, tf.float32).numpy())
    np.testing.assert_array_equal(got[1], tf.cast(dx, tf.float32).numpy())
    tolerance = 2.0 ** -7 if dtype == tf.bfloat16 else 1e-5
    np.testing.assert_allclose(got[2], tf.cast(dalpha, tf.float32).numpy(), rtol=tolerance,
                               atol=1e-4)


def test_same_values_with_one_intra_op_thread(run_with_one_intra_op_thread, tmp_path):
    """With a one-thread pool the op splits its rows over threads of its own: the same values,
    and the slope gradient summed in the same block order (bit for bit)."""
    x, alpha, dy = _problem((20000, 80), 1, tf.bfloat16, seed=5)
    here = _fused(x, alpha, dy, tf.bfloat16)
    np.savez(tmp_path / "problem.npz", x=x, alpha=alpha, dy=dy)
    out = run_with_one_intra_op_thread(f"""
problem = np.load({str(tmp_path / "problem.npz")!r})
x, a, dy = (tf.cast(tf.constant(problem[k]), tf.bfloat16) for k in ("x", "alpha", "dy"))
for threads in (1, 2):
    y = lib.sim_merlin_prelu(x, a, threads=threads)
    dx, da = lib.sim_merlin_prelu_grad(x, a, dy, threads=threads)
    for t in (y, dx, da):
        print(np.asarray(tf.cast(t, tf.float32)).astype(np.float64).sum().hex())
""")
    want = [float(np.asarray(t, np.float64).sum()).hex() for t in here]
    lines = out.split()
    assert lines[:3] == want and lines[3:] == want


def test_bad_shapes_are_named():
    with pytest.raises(tf.errors.InvalidArgumentError, match="trailing dimensions"):
        prelu(tf.zeros([4, 5]), tf.zeros([4]))
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        prelu(tf.zeros([4, 5], tf.float16), tf.zeros([5]))
