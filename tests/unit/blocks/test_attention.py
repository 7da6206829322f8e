import numpy as np
import pytest
import tensorflow as tf

from sim_merlin.blocks.attention import TargetAttention

pytestmark = pytest.mark.compat_lock


def _numpy_attention(query, keys, mask, normalize, score_fn=None):
    scores = (keys * query[:, None, :]).sum(-1) if score_fn is None else score_fn(query, keys)
    weights = np.zeros_like(scores)
    for b in range(len(scores)):
        valid = mask[b].astype(bool)
        if not valid.any():
            continue
        if normalize:
            e = np.exp(scores[b, valid] - scores[b, valid].max())
            weights[b, valid] = e / e.sum()
        else:
            weights[b, valid] = scores[b, valid]
    return (weights[..., None] * keys).sum(1), weights


def _batch(seed=0, batch=5, length=7, dim=4):
    rng = np.random.default_rng(seed)
    query = rng.normal(size=(batch, dim)).astype(np.float32)
    keys = rng.normal(size=(batch, length, dim)).astype(np.float32)
    lengths = np.array([7, 3, 1, 0, 5])[:batch]
    mask = (np.arange(length)[None, :] >= length - lengths[:, None]).astype(np.float32)
    return query, keys * mask[..., None], mask, lengths


@pytest.mark.parametrize("normalize", [True, False])
def test_dot_attention_matches_numpy_with_padding_and_empty_rows(normalize):
    query, keys, mask, _ = _batch()
    pooled, weights = TargetAttention("dot", normalize=normalize)(query, keys, mask, return_weights=True)
    want_pooled, want_weights = _numpy_attention(query, keys, mask, normalize)
    np.testing.assert_allclose(weights.numpy(), want_weights, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pooled.numpy(), want_pooled, rtol=1e-5, atol=1e-6)
    assert np.isfinite(pooled.numpy()).all()
    assert (weights.numpy()[3] == 0).all() and (pooled.numpy()[3] == 0).all()  # all padding


def test_din_activation_unit_matches_numpy():
    query, keys, mask, _ = _batch(1)
    layer = TargetAttention("din", normalize=False, hidden_units=(6, 3))
    pooled, weights = layer(query, keys, mask, return_weights=True)
    dense = layer.score_layers
    sigmoid = lambda x: 1 / (1 + np.exp(-x))

    def score(q, k):
        qt = np.broadcast_to(q[:, None, :], k.shape)
        h = np.concatenate([k, qt, k - qt, k * qt], -1)
        for d in dense[:-1]:
            w, b = (v.numpy() for v in d.weights)
            h = sigmoid(h @ w + b)
        w, b = (v.numpy() for v in dense[-1].weights)
        return (h @ w + b)[..., 0]

    want_pooled, want_weights = _numpy_attention(query, keys, mask, False, score)
    np.testing.assert_allclose(weights.numpy(), want_weights, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(pooled.numpy(), want_pooled, rtol=1e-4, atol=1e-5)


def test_ragged_keys_give_the_dense_result():
    query, keys, mask, lengths = _batch()
    rows = [keys[b, keys.shape[1] - n :] for b, n in enumerate(lengths)]
    ragged = tf.ragged.constant([r.tolist() for r in rows], ragged_rank=1, inner_shape=(4,))
    layer = TargetAttention("dot")
    np.testing.assert_allclose(layer(query, ragged).numpy(), layer(query, keys, mask).numpy(),
                               rtol=1e-6)


def test_graph_mode_equals_eager_and_gradients_are_finite():
    query, keys, mask, _ = _batch()
    layer = TargetAttention("din", normalize=True)
    eager = layer(query, keys, mask)
    graph = tf.function(lambda q, k, m: layer(q, k, m))(query, keys, mask)
    np.testing.assert_allclose(eager.numpy(), graph.numpy(), rtol=1e-6)
    keys_var = tf.Variable(keys)
    with tf.GradientTape() as tape:
        out = tf.reduce_sum(layer(query, keys_var, mask))
    grad = tape.gradient(out, keys_var).numpy()
    assert np.isfinite(grad).all()
    assert (grad[mask == 0] == 0).all()


def test_config_round_trip_and_keras_serialization():
    layer = TargetAttention("din", normalize=False, hidden_units=(5,), activation="relu")
    clone = TargetAttention.from_config(layer.get_config())
    assert (clone.scoring, clone.normalize, clone.hidden_units, clone.activation) == (
        "din", False, (5,), "relu")
    revived = tf.keras.layers.deserialize(tf.keras.layers.serialize(layer))
    assert type(revived) is TargetAttention and revived.hidden_units == (5,)
    with pytest.raises(ValueError, match="scoring must be one of"):
        TargetAttention("cosine")
