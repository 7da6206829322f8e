"""The fused dot-product attention (dot_attention.cc) against a float64 numpy computation
(outputs and both gradients, float32 and bfloat16), against TargetAttention's TensorFlow-ops path,
with rows without a valid step, unzeroed padding, bad shapes and the one-thread pool path."""
import numpy as np
import pytest

import sim_merlin  # noqa: F401  (before tensorflow)
import tensorflow as tf

from sim_merlin.blocks.attention import TargetAttention
from sim_merlin.kernels import build, dot_attention, model_ops

pytestmark = [pytest.mark.compat_lock,
              pytest.mark.skipif(not build.usable(), reason="fused kernels not built here")]


def problem(batch=40, length=23, dim=12, seed=0):
    rng = np.random.default_rng(seed)
    query = rng.normal(size=(batch, dim)).astype(np.float32)
    keys = (rng.normal(size=(batch, length, dim)) * 0.7).astype(np.float32)
    mask = rng.random((batch, length)) > 0.4
    mask[0] = False          # no valid step
    mask[1] = False
    mask[1, -1] = True       # one valid step
    mask[2] = True           # all valid
    keys[~mask] = rng.normal(size=(int((~mask).sum()), dim)) * 50  # padding is not zeroed
    pooled_grad = rng.normal(size=(batch, dim)).astype(np.float32)
    weights_grad = rng.normal(size=(batch, length)).astype(np.float32)
    return query, keys, mask, pooled_grad, weights_grad


def numpy_attention(query, keys, mask, pooled_grad, weights_grad):
    """Forward and backward in float64, written from the definitions (softmax Jacobian)."""
    q, k = query.astype(np.float64), keys.astype(np.float64)
    weights = np.zeros(mask.shape)
    for b in range(mask.shape[0]):
        valid = np.flatnonzero(mask[b])
        if valid.size:
            scores = k[b, valid] @ q[b]
            e = np.exp(scores - scores.max())
            weights[b, valid] = e / e.sum()
    pooled = np.einsum("bl,bld->bd", weights, k)
    query_grad, keys_grad = np.zeros_like(q), np.zeros_like(k)
    for b in range(mask.shape[0]):
        w = weights[b]
        jacobian = np.diag(w) - np.outer(w, w)               # d weights / d scores
        d_weights = k[b] @ pooled_grad[b] + weights_grad[b]   # [L]
        d_scores = jacobian @ d_weights * mask[b]
        query_grad[b] = d_scores @ k[b]
        keys_grad[b] = np.outer(w, pooled_grad[b]) + np.outer(d_scores, q[b])
    return pooled, weights, query_grad, keys_grad


def fused(query, keys, mask, pooled_grad, weights_grad, dtype):
    q, k = tf.constant(query, dtype), tf.constant(keys, dtype)
    with tf.GradientTape() as tape:
        tape.watch([q, k])
        pooled, weights = dot_attention.dot_attention(q, k, tf.constant(mask))
        loss = (tf.reduce_sum(tf.cast(pooled, tf.float32) * pooled_grad)
                + tf.reduce_sum(tf.cast(weights, tf.float32) * weights_grad))
    grads = tape.gradient(loss, [q, k])
    as_float = lambda x: tf.cast(x, tf.float32).numpy()  # noqa: E731
    return [as_float(x) for x in (pooled, weights, *grads)]


def rounded(x, dtype):
    return tf.cast(tf.cast(x, dtype), tf.float32).numpy()


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
@pytest.mark.parametrize("dim", [12, 32, 48])  # 32, 48: the one-head gradient's AVX-512 path
def test_values_and_gradients_match_numpy(dtype, dim):
    query, keys, mask, pooled_grad, weights_grad = problem(dim=dim)
    # The kernel sees the inputs in `dtype`: compare with numpy on those same values.
    inputs = [rounded(x, dtype) for x in (query, keys, pooled_grad, weights_grad)]
    want = numpy_attention(inputs[0], inputs[1], mask, inputs[2], inputs[3])
    got = fused(query, keys, mask, pooled_grad, weights_grad, dtype)
    # float32 arithmetic inside; bfloat16 outputs are rounded once (relative 2^-8).
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == tf.float32 else dict(rtol=8e-3, atol=8e-3)
    for name, g, w in zip(("pooled", "weights", "query_grad", "keys_grad"), got, want):
        np.testing.assert_allclose(g, w, err_msg=name, **tolerance)
    pooled, weights, query_grad, keys_grad = got
    assert not weights[0].any() and not pooled[0].any() and not query_grad[0].any()
    assert weights[1, -1] == 1.0 and not weights[1, :-1].any()
    np.testing.assert_array_equal(weights[~mask], 0.0)    # padding: weight exactly 0 ...
    np.testing.assert_array_equal(keys_grad[~mask], 0.0)  # ... and no gradient
    np.testing.assert_allclose(weights[mask.any(1)].sum(1), 1.0, rtol=1e-2)


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
def test_several_heads_match_numpy(dtype):
    """dot_reads: SIM's three reads of its long history (softmax over the valid steps, softmax
    over the selected ones, the masked sum of the selected ones) against numpy, heads computed
    one by one and their gradients summed."""
    query, keys, mask, _, _ = problem(seed=9)
    rng = np.random.default_rng(10)
    selection = mask & (rng.random(mask.shape) > 0.5)
    masks = np.stack([mask, selection, selection], axis=1)
    normalize = [True, True, False]
    reads_grad = rng.normal(size=(mask.shape[0], 3, keys.shape[2])).astype(np.float32)
    weights_grad = rng.normal(size=masks.shape).astype(np.float32)
    q, k = tf.constant(query, dtype), tf.constant(keys, dtype)
    with tf.GradientTape() as tape:
        tape.watch([q, k])
        reads, weights = dot_attention.dot_reads(q, k, masks, normalize)
        loss = (tf.reduce_sum(tf.cast(reads, tf.float32) * reads_grad)
                + tf.reduce_sum(tf.cast(weights, tf.float32) * weights_grad))
    got = [tf.cast(x, tf.float32).numpy() for x in (reads, weights, *tape.gradient(loss, [q, k]))]
    qf, kf = rounded(query, dtype), rounded(keys, dtype)
    dr, dw = rounded(reads_grad, dtype), rounded(weights_grad, dtype)
    want_reads, want_weights = [], []
    want_dq, want_dk = np.zeros(qf.shape), np.zeros(kf.shape)
    for h in range(3):
        if normalize[h]:
            r, w, dq, dk = numpy_attention(qf, kf, masks[:, h], dr[:, h], dw[:, h])
        else:  # a masked sum: constant weights, no gradient through the scores
            w = masks[:, h].astype(np.float64)
            r = np.einsum("bl,bld->bd", w, kf)
            dq, dk = 0.0, w[:, :, None] * dr[:, h][:, None, :]
        want_reads.append(r)
        want_weights.append(w)
        want_dq, want_dk = want_dq + dq, want_dk + dk
    want = [np.stack(want_reads, 1), np.stack(want_weights, 1), want_dq, want_dk]
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == tf.float32 else dict(rtol=1e-2, atol=2e-2)
    for name, g, w in zip(("reads", "weights", "query_grad", "keys_grad"), got, want):
        np.testing.assert_allclose(g, w, err_msg=name, **tolerance)
    np.testing.assert_array_equal(got[1][:, 2], masks[:, 2])  # the sum head's weights: the mask


def test_only_the_pooled_output_may_be_used():
    query, keys, mask, pooled_grad, _ = problem(seed=3)
    q, k = tf.constant(query), tf.constant(keys)
    with tf.GradientTape() as tape:
        tape.watch([q, k])
        pooled, _ = dot_attention.dot_attention(q, k, mask)
        loss = tf.reduce_sum(pooled * pooled_grad)
    got = [g.numpy() for g in tape.gradient(loss, [q, k])]
    want = numpy_attention(query, keys, mask, pooled_grad, np.zeros(mask.shape))[2:]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_target_attention_uses_it_with_the_values_of_its_plain_path(policy):
    """TargetAttention("dot", normalize=True) takes the fused op when the kernels are available;
    its TensorFlow-ops path (model_ops.plain_ops) gives the same outputs and gradients."""
    query, keys, mask, pooled_grad, weights_grad = problem(seed=5)
    dtype = tf.float32 if policy == "float32" else tf.bfloat16
    attention = TargetAttention("dot", normalize=True)

    def run():
        q, k = tf.constant(query, dtype), tf.constant(keys, dtype)
        with tf.GradientTape() as tape:
            tape.watch([q, k])
            pooled, weights = attention(q, k, tf.constant(mask), return_weights=True)
            loss = (tf.reduce_sum(tf.cast(pooled, tf.float32) * pooled_grad)
                    + tf.reduce_sum(tf.cast(weights, tf.float32) * weights_grad))
        return [tf.cast(x, tf.float32).numpy() for x in (pooled, weights, *tape.gradient(loss,
                                                                                        [q, k]))]

    graph = tf.function(lambda q, k: attention(q, k, tf.constant(mask))).get_concrete_function(
        tf.TensorSpec(query.shape, dtype), tf.TensorSpec(keys.shape, dtype)).graph
    assert [op.type for op in graph.get_operations()].count("SimMerlinDotAttention") == 1
    got = run()
    with model_ops.plain_ops():
        want = run()
    # The plain path rounds scores and weights to bfloat16 between its ops.
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == tf.float32 else dict(rtol=0.05, atol=0.05)
    for name, g, w in zip(("pooled", "weights", "query_grad", "keys_grad"), got, want):
        np.testing.assert_allclose(g, w, err_msg=name, **tolerance)


def test_shapes_that_do_not_match_are_named():
    with pytest.raises(tf.errors.InvalidArgumentError, match="do not match keys"):
        dot_attention.dot_attention(tf.zeros([3, 4]), tf.zeros([3, 5, 4]), tf.ones([3, 6], tf.bool))
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        dot_attention.dot_attention(tf.zeros([3, 4]), tf.zeros([3, 5, 4], tf.float64),
                                    tf.ones([3, 5], tf.bool))


def test_own_threads_give_the_same_values(run_with_one_intra_op_thread):
    out = run_with_one_intra_op_thread("""
from sim_merlin.kernels import dot_attention
rng = np.random.default_rng(0)
q = tf.constant(rng.normal(size=(300, 32)), tf.bfloat16)
k = tf.constant(rng.normal(size=(300, 50, 32)), tf.bfloat16)
mask = tf.constant(rng.random((300, 50)) > 0.3)
upstream = tf.constant(rng.normal(size=(300, 32)), tf.bfloat16)
results = []
for rows in (300, 7):  # all rows at once (own threads), and in pieces of 7 (one block each)
    outs = []
    for start in range(0, 300, rows):
        piece = slice(start, start + rows)
        with tf.GradientTape() as tape:
            tape.watch([q, k])
            pooled, weights = dot_attention.dot_attention(q[piece], k[piece], mask[piece])
            loss = tf.reduce_sum(tf.cast(pooled * upstream[piece], tf.float32))
        outs.append([pooled, weights, *tape.gradient(loss, [q, k])])
    results.append(outs)
whole = [tf.bitcast(x, tf.uint16).numpy() for x in results[0][0][:2]]
pieces = [np.concatenate([tf.bitcast(o[i], tf.uint16).numpy() for o in results[1]]) for i in (0, 1)]
print(all(np.array_equal(a, b) for a, b in zip(whole, pieces)))
keys_grad = sum(tf.cast(o[3], tf.float32) for o in results[1]).numpy()
print(bool(np.array_equal(tf.cast(results[0][0][3], tf.float32).numpy(), keys_grad)))
""")
    assert out.split()[-2:] == ["True", "True"]
