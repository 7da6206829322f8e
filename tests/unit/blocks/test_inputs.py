import numpy as np
import pytest
import tensorflow as tf

from sim_merlin.blocks.inputs import BehaviourEmbeddings, SchemaMismatchError
from merlin.schema import Schema

from sim_merlin.schema import sample_schema

pytestmark = pytest.mark.compat_lock
L, S = 6, 2


def _schema(**kwargs):
    return sample_schema({"item_id": 30, "category_id": 5}, {"user_id": 7}, history_length=L, **kwargs)


def _batch():
    rng = np.random.default_rng(0)
    lengths = np.array([6, 3, 0, 1])
    mask = np.arange(L)[None, :] >= L - lengths[:, None]
    items = rng.integers(3, 30, (4, L)) * mask
    return {
        "user_id": tf.constant([[1], [2], [3], [4]]),
        "item_id": tf.constant(rng.integers(3, 30, 4)),
        "category_id": tf.constant(rng.integers(3, 5, 4)),
        "item_id_history": tf.constant(items),
        "category_id_history": tf.constant(rng.integers(3, 5, (4, L)) * mask),
        "item_id_neg_history": tf.constant(rng.integers(3, 30, (4, L)) * mask),
        "category_id_neg_history": tf.constant(rng.integers(3, 5, (4, L)) * mask),
    }, mask


def test_embeddings_split_and_masks_match_numpy():
    batch, mask = _batch()
    layer = BehaviourEmbeddings(_schema(), embedding_dim=3, short_length=S)
    out = layer(batch)
    item, cat, user = (layer.tables[d].embeddings.numpy() for d in ("item_id", "category_id", "user_id"))
    assert item.shape == (30, 3) and cat.shape == (5, 3) and user.shape == (7, 3)
    assert np.abs(item).max() <= np.sqrt(1 / 30)
    np.testing.assert_allclose(out["user"].numpy(), user[[1, 2, 3, 4]])
    want_target = np.concatenate([item[batch["item_id"].numpy()], cat[batch["category_id"].numpy()]], -1)
    np.testing.assert_allclose(out["target"].numpy(), want_target)
    history = np.concatenate([item[batch["item_id_history"].numpy()],
                              cat[batch["category_id_history"].numpy()]], -1) * mask[..., None]
    np.testing.assert_allclose(out["long"].numpy(), history[:, : L - S])
    np.testing.assert_allclose(out["short"].numpy(), history[:, L - S :])
    np.testing.assert_array_equal(out["long_mask"].numpy(), mask[:, : L - S])
    np.testing.assert_array_equal(out["short_mask"].numpy(), mask[:, L - S :])
    negative = np.concatenate([item[batch["item_id_neg_history"].numpy()],
                               cat[batch["category_id_neg_history"].numpy()]], -1)[:, L - S :]
    np.testing.assert_allclose(out["short_negative"].numpy(), negative * mask[:, L - S :, None])
    np.testing.assert_array_equal(out["target_search_key"].numpy(), batch["category_id"].numpy())
    np.testing.assert_array_equal(out["long_search_keys"].numpy(),
                                  batch["category_id_history"].numpy()[:, : L - S])


def test_one_shared_item_table_receives_gradients_from_target_and_histories():
    batch, mask = _batch()
    layer = BehaviourEmbeddings(_schema(), embedding_dim=3, short_length=S)
    with tf.GradientTape() as tape:
        out = layer(batch)
        loss = tf.reduce_sum(out["target"]) + tf.reduce_sum(out["long"]) + tf.reduce_sum(out["short_negative"])
    item_tables = [v for v in layer.trainable_variables if "item_id" in v.name]
    assert len(item_tables) == 1 and len(layer.trainable_variables) == 3
    grad = tape.gradient(loss, item_tables[0])
    dense = tf.convert_to_tensor(grad).numpy()
    used = set(batch["item_id"].numpy()) | set(batch["item_id_history"].numpy()[:, : L - S][mask[:, : L - S]])
    used |= set(batch["item_id_neg_history"].numpy()[:, L - S :][mask[:, L - S :]])
    assert {int(i) for i in np.flatnonzero(np.abs(dense).sum(1))} == {int(i) for i in used}


def test_ragged_histories_give_the_dense_result():
    batch, mask = _batch()
    layer = BehaviourEmbeddings(_schema(), embedding_dim=3, short_length=S)
    ragged = dict(batch)
    for name in ("item_id_history", "category_id_history", "item_id_neg_history", "category_id_neg_history"):
        rows = [row[m].tolist() for row, m in zip(batch[name].numpy(), mask)]
        ragged[name] = tf.ragged.constant(rows, dtype=tf.int64)
    dense_out, ragged_out = layer(batch), layer(ragged)
    for key in dense_out:
        np.testing.assert_allclose(np.asarray(ragged_out[key]), np.asarray(dense_out[key]))


def test_schema_mismatches_are_clear_errors():
    schema = _schema()
    with pytest.raises(SchemaMismatchError, match="no column tagged 'target_item'"):
        BehaviourEmbeddings(schema.excluding_by_name(["item_id", "category_id"]))
    with pytest.raises(SchemaMismatchError, match="do not pair"):
        BehaviourEmbeddings(schema.excluding_by_name(["category_id_history"]))
    other = schema["category_id_neg_history"].with_properties(
        {**schema["category_id_neg_history"].properties, "value_count": {"min": 4, "max": 4}})
    with pytest.raises(SchemaMismatchError, match="different lengths"):
        BehaviourEmbeddings(schema.excluding_by_name(["category_id_neg_history"]) + Schema([other]))
    with pytest.raises(SchemaMismatchError, match="short_length must be in 1 .. 5"):
        BehaviourEmbeddings(schema, short_length=6)
    with pytest.raises(SchemaMismatchError, match="hard-search feature 'brand'"):
        BehaviourEmbeddings(schema, search_feature="brand")


def test_config_round_trip_keeps_the_schema():
    layer = BehaviourEmbeddings(_schema(), embedding_dim=5, short_length=3)
    revived = tf.keras.layers.deserialize(tf.keras.layers.serialize(layer))
    assert type(revived) is BehaviourEmbeddings
    assert (revived.embedding_dim, revived.short_length, revived.long_length) == (5, 3, 3)
    assert revived.layout.features == ["item_id", "category_id"]


def _gathers(layer, batch, outputs):
    """Table lookups in the traced graph (a fused lookup op reads N tables, G times for a group
    of lookups)."""
    graph = tf.function(lambda b: layer(b, outputs=outputs)).get_concrete_function(batch).graph
    return sum(1 if op.type == "ResourceGather" else op.get_attr("N") *
               (op.get_attr("G") if op.type == "SimMerlinEmbeddingRowGroups" else 1)
               for op in graph.get_operations()
               if op.type in ("ResourceGather", "SimMerlinEmbeddingRows",
                              "SimMerlinEmbeddingRowGroups"))


def test_only_the_outputs_asked_for_are_computed():
    batch, _ = _batch()
    layer = BehaviourEmbeddings(_schema(), embedding_dim=3, short_length=S)
    everything = layer(batch)
    some = layer(batch, outputs=("short", "short_mask", "target"))
    assert set(some) == {"short", "short_mask", "target"}
    for key in some:
        np.testing.assert_array_equal(some[key].numpy(), everything[key].numpy())
    # A lookup reads a variable, so TensorFlow would run it even if unused: it must not exist.
    # Two item features: one gather per feature and per embedded input.
    assert _gathers(layer, batch, ("target",)) == 2
    assert _gathers(layer, batch, ("target", "short", "short_mask")) == 4
    # user; target and 7 sequences (history, history_unmasked, long, long_unmasked, short and
    # 2 negatives)
    assert _gathers(layer, batch, None) == 1 + 2 * 8
    with pytest.raises(ValueError, match="unknown outputs"):
        layer(batch, outputs=("shorts",))


def _sorted_rows(slices):
    """An IndexedSlices' (index, row) pairs as one array sorted by index, then by the row."""
    values = slices.values.numpy().reshape(len(slices.indices), -1).astype(np.float64)
    rows = np.concatenate([slices.indices.numpy()[:, None].astype(np.float64), values], axis=1)
    return rows[np.lexsort(rows.T[::-1])]


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_fused_lookups_give_the_bits_and_gradients_of_the_plain_ones(policy):
    """With the fused kernels, each sequence's lookups are one op (embedding_rows); the outputs
    and the tables' gradients must be those of gather + cast + concat."""
    from sim_merlin.kernels import model_ops

    if not model_ops.available():
        pytest.skip("fused kernels not built here")
    batch, _ = _batch()
    previous = tf.keras.mixed_precision.global_policy()
    tf.keras.mixed_precision.set_global_policy(policy)
    try:
        layer = BehaviourEmbeddings(_schema(), embedding_dim=3, short_length=S)
        layer(batch)  # builds the tables

        def run():
            with tf.GradientTape() as tape:
                out = layer(batch)
                loss = tf.add_n([tf.reduce_sum(tf.cast(v, tf.float32) ** 2)
                                 for k, v in sorted(out.items()) if v.dtype.is_floating])
            return out, tape.gradient(loss, layer.trainable_variables)

        fused, fused_grads = run()
        with model_ops.plain_ops():
            plain, plain_grads = run()
    finally:
        tf.keras.mixed_precision.set_global_policy(previous)
    assert _gathers(layer, batch, None) == 1 + 2 * 8
    graph = tf.function(lambda b: layer(b)).get_concrete_function(batch).graph
    # The user's lookup, and the item tables' 8 lookups (target and 7 sequences) as one op:
    # one gradient per table, not one per lookup.
    assert [op.get_attr("G") if op.type == "SimMerlinEmbeddingRowGroups" else 1
            for op in graph.get_operations()
            if op.type.startswith("SimMerlinEmbeddingRow")] in ([1, 8], [8, 1])
    for key, value in plain.items():
        assert fused[key].dtype == value.dtype, key
        np.testing.assert_array_equal(fused[key].numpy(), value.numpy(), key)
    for got, want in zip(fused_grads, plain_grads):
        # The same gradient rows, bit for bit, each with its index. The order in which the tape
        # concatenates a table's several reads depends on when each read's gradient is ready
        # (the masked reads have no product by the mask in the fused path), so compare them
        # sorted by index, then by value.
        if got.values.shape[0] == want.values.shape[0]:
            np.testing.assert_array_equal(*(_sorted_rows(g) for g in (got, want)))
        else:  # a small table read often: its rows come summed per table row (embedding_rows)
            assert got.values.shape[0] == len(np.unique(want.indices.numpy()))
            np.testing.assert_allclose(tf.convert_to_tensor(got).numpy(),
                                       tf.convert_to_tensor(want).numpy(), rtol=1e-5, atol=1e-5)
