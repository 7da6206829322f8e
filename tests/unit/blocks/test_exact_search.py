import numpy as np
import pytest
import tensorflow as tf

from sim_merlin.blocks.exact_search import ExactSearchUnit, masked_mean

pytestmark = pytest.mark.compat_lock


def _selected(seed=0, batch=4, k=5, dim=8):
    rng = np.random.default_rng(seed)
    query = rng.normal(size=(batch, dim)).astype(np.float32)
    counts = np.array([5, 2, 0, 1])[:batch]
    mask = np.arange(k)[None, :] < counts[:, None]  # GSU output: valid slots first
    selected = rng.normal(size=(batch, k, dim)).astype(np.float32) * mask[..., None]
    return query, selected, mask


def _softmax_masked(scores, valid):
    out = np.zeros_like(scores)
    if valid.any():
        e = np.exp(scores[valid] - scores[valid].max())
        out[valid] = e / e.sum()
    return out


@pytest.mark.parametrize("denominator", ["count", "count_plus_one"])
def test_masked_mean_matches_numpy(denominator):
    _, selected, mask = _selected()
    got = masked_mean(tf.constant(selected), tf.constant(mask), denominator == "count_plus_one").numpy()
    counts = mask.sum(1, keepdims=True)
    total = (selected * mask[..., None]).sum(1)
    want = total / (counts + 1) if denominator == "count_plus_one" else np.divide(
        total, counts, out=np.zeros_like(total), where=counts > 0)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_dot_variant_is_the_reference_unit():
    query, selected, mask = _selected(1)
    esu = ExactSearchUnit(attention="dot", mean_denominator="count_plus_one")
    out = esu(query, selected, mask).numpy()
    for b in range(len(query)):
        w = _softmax_masked((selected[b] * query[b]).sum(-1), mask[b])
        np.testing.assert_allclose(out[b, :8], (w[:, None] * selected[b]).sum(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out[b, 8:], selected[b][mask[b]].sum(0) / (mask[b].sum() + 1),
                                   rtol=1e-5, atol=1e-6)


def test_multihead_attention_matches_numpy():
    query, selected, mask = _selected(2)
    esu = ExactSearchUnit(attention="multihead", heads=2, head_dim=3)
    out, weights = esu(query, selected, mask, return_weights=True)
    wq, wk, wv = (esu.query_projection.kernel.numpy(), esu.key_projection.kernel.numpy(),
                  esu.value_projection.kernel.numpy())
    assert out.shape == (4, 2 * 3 + 8)
    for b in range(len(query)):
        q, k, v = query[b] @ wq, selected[b] @ wk, selected[b] @ wv
        heads = []
        for h in range(2):
            cols = slice(3 * h, 3 * h + 3)
            w = _softmax_masked(k[:, cols] @ q[cols] / np.sqrt(3), mask[b])
            np.testing.assert_allclose(weights.numpy()[b, h], w, rtol=1e-5, atol=1e-6)
            heads.append(w @ v[:, cols])
        np.testing.assert_allclose(out.numpy()[b, :6], np.concatenate(heads), rtol=1e-5, atol=1e-6)
    assert np.isfinite(out.numpy()).all() and (out.numpy()[2] == 0).all()  # empty selection


def test_graph_mode_gradients_and_serialization():
    query, selected, mask = _selected(3)
    esu = ExactSearchUnit(attention="multihead", heads=4, include_mean=False)
    eager = esu(query, selected, mask)
    graph = tf.function(lambda q, s, m: esu(q, s, m))(query, selected, mask)
    np.testing.assert_allclose(eager.numpy(), graph.numpy(), rtol=1e-5, atol=1e-6)
    assert eager.shape == (4, 8)  # 4 heads x (8 // 4)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(esu(query, selected, mask) ** 2)
    grads = tape.gradient(loss, esu.trainable_variables)
    assert len(grads) == 3 and all(np.isfinite(g.numpy()).all() for g in grads)
    clone = tf.keras.layers.deserialize(tf.keras.layers.serialize(esu))
    assert (clone.attention, clone.heads, clone.include_mean) == ("multihead", 4, False)
    with pytest.raises(ValueError, match="attention must be one of"):
        ExactSearchUnit(attention="sparse")
