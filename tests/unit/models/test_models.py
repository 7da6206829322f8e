"""SIM, DIN and DIEN: reference parameter counts; fit, save, reload through the Merlin dataloader."""
import contextlib

import numpy as np
import pytest
import tensorflow as tf
from merlin.dataloader.tensorflow import Loader
from merlin.io import Dataset

from sim_merlin.models.dien import DIENBlock, DIENModel
from sim_merlin.models.din import DINBlock, DINModel
from sim_merlin.models.sim import SIMBlock, SIMModel
from sim_merlin.schema import sample_schema

pytestmark = [pytest.mark.compat_lock, pytest.mark.slow]


@pytest.mark.parametrize("block,expected", [(SIMBlock, 223_212), (DINBlock, 32_641),
                                            (DIENBlock, 193_811)])
def test_reference_compatible_models_have_the_reference_parameter_counts(block, expected):
    # The reference's Amazon Books setting: E=16, history 100 split 90/10, k=50.
    schema = sample_schema({"item_id": 1_000, "category_id": 50}, {"user_id": 300}, 100)
    layer = block(schema, embedding_dim=16, reference_compatible=True)
    rng = np.random.default_rng(0)
    batch = {name: tf.constant(rng.integers(1, 50, (4, 100) if "history" in name else (4,)))
             for name in schema.column_names if name != "label"}
    if block is DINBlock:
        layer(batch)
    else:  # the auxiliary network is built when a loss is computed
        layer(batch, targets=tf.constant([1, 0, 1, 0]), training=True)
    dense = sum(int(np.prod(v.shape)) for v in layer.trainable_variables
                if "embeddings" not in v.name)
    assert dense == expected


def test_reference_mode_switches_to_the_reference_choices():
    schema = sample_schema({"item_id": 10, "category_id": 4}, {"user_id": 5}, 20)
    block = SIMBlock(schema, search_mode="hard", esu_attention="multihead", reference_compatible=True)
    assert (block.search.mode, block.exact_search.attention) == ("soft", "dot")
    assert block.exact_search.mean_denominator == "count_plus_one"
    assert not block.extractor.use_mask and block.auxiliary.reference_compatible


@pytest.mark.parametrize("factory,options", [
    (SIMModel, {"top_k": 6}),
    (SIMModel, {"top_k": 6, "search_mode": "hard", "esu_heads": 2}),
    (SIMModel, {"top_k": 6, "reference_compatible": True}),
    (DINModel, {}),
    (DINModel, {"reference_compatible": True}),
    (DIENModel, {}),
    (DIENModel, {"reference_compatible": True}),
])
def test_one_step_fit_save_reload_identical_predictions(tiny_dataset, fit_save_reload, factory,
                                                        options):
    train = Dataset(str(tiny_dataset / "train"), engine="parquet")
    tf.keras.utils.set_random_seed(3)
    model = factory(train.schema, embedding_dim=8, short_length=5, **options)
    before, after = fit_save_reload(model, tiny_dataset / "train")
    assert before.shape == (32, 1) and ((before > 0) & (before < 1)).all()
    np.testing.assert_array_equal(after, before)


def test_sim_loss_is_half_the_two_stage_cross_entropies_plus_the_auxiliary_loss(tiny_dataset):
    train = Dataset(str(tiny_dataset / "train"), engine="parquet")
    model = SIMModel(train.schema, embedding_dim=8, short_length=5, top_k=6)
    model.compile(optimizer="sgd")
    batch, target = next(iter(Loader(train, batch_size=64, shuffle=False)))
    reported = model.evaluate(batch, target, verbose=0, return_dict=True)["loss"]
    block = model.blocks[0]
    out = block.forward(batch)
    e = out["embedded"]
    aux = float(block.auxiliary(out["states"], e["short"], e["short_negative"], e["short_mask"]))
    y = np.asarray(target["label"] if isinstance(target, dict) else target).ravel().astype(float)

    def bce(logits):
        p = 1 / (1 + np.exp(-np.asarray(logits, np.float64).ravel()))
        p = np.clip(p, 1e-7, 1 - 1e-7)  # Keras clips probabilities the same way
        return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())

    want = 0.5 * (bce(out["stage_one"]) + bce(out["stage_two"])) + aux
    assert reported == pytest.approx(want, rel=1e-4)
    assert aux > 0.5  # the auxiliary term is really there (about 2 log 2 untrained)


@pytest.mark.parametrize("block_class", [SIMBlock, DINBlock, DIENBlock])
def test_models_take_ragged_histories_and_agree_in_eager_and_graph_mode(block_class):
    schema = sample_schema({"item_id": 40, "category_id": 6}, {"user_id": 9}, 8)
    kwargs = {"top_k": 3} if block_class is SIMBlock else {}
    block = block_class(schema, embedding_dim=4, short_length=3, **kwargs)
    rng = np.random.default_rng(1)
    lengths = np.array([8, 5, 1, 3])
    mask = np.arange(8)[None, :] >= 8 - lengths[:, None]
    dense = {"user_id": tf.constant(rng.integers(3, 9, 4)), "item_id": tf.constant(rng.integers(3, 40, 4)),
             "category_id": tf.constant(rng.integers(3, 6, 4))}
    ragged = dict(dense)
    for name, high in (("item_id", 40), ("category_id", 6)):
        for suffix in ("_history", "_neg_history"):
            values = rng.integers(3, high, (4, 8)) * mask
            dense[name + suffix] = tf.constant(values)
            ragged[name + suffix] = tf.ragged.constant([row[m].tolist() for row, m in zip(values, mask)],
                                                       dtype=tf.int64)
    eager = block(dense).numpy()
    np.testing.assert_allclose(block(ragged).numpy(), eager, rtol=1e-6, atol=1e-7)
    graph = tf.function(lambda features: block(features))(dense).numpy()
    np.testing.assert_allclose(graph, eager, rtol=1e-5, atol=1e-6)


def sim_block_and_batch(options, seed):
    """A small SIMBlock with ``options`` and a batch of 6 rows, histories of 16 padded to random
    lengths (0 to 16); the random generator, for more draws."""
    schema = sample_schema({"item_id": 40, "category_id": 5}, {"user_id": 9}, 16)
    block = SIMBlock(schema, embedding_dim=4, short_length=4, top_k=5, **options)
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 17, 6)
    valid = np.arange(16)[None, :] >= 16 - lengths[:, None]
    batch = {"user_id": tf.constant(rng.integers(1, 9, 6)),
             "item_id": tf.constant(rng.integers(1, 40, 6)),
             "category_id": tf.constant(rng.integers(1, 5, 6))}
    for name, high in (("item_id", 40), ("category_id", 5)):
        for suffix in ("_history", "_neg_history"):
            batch[name + suffix] = tf.constant(rng.integers(1, high, (6, 16)) * valid)
    return block, batch, rng


@pytest.mark.parametrize("options", [{"reference_compatible": True},
                                     {"search_mode": "hard", "esu_attention": "dot"}])
@pytest.mark.parametrize("plain", [False, True])
def test_sim_reads_the_long_history_in_one_product_as_the_blocks_do(options, plain):
    # The dot-product ESU path of SIMBlock.read_long_history (scores once, the three weighted
    # sums as one op, kernels/dot_attention.cc, or as one batched product in TensorFlow ops)
    # against the three blocks called one by one: values and gradients into the target and the
    # long history.
    from sim_merlin.kernels import model_ops

    if plain:
        with model_ops.plain_ops():
            return check_long_history_reads(options, plain=True)
    return check_long_history_reads(options, plain=False)


def check_long_history_reads(options, plain):
    block, batch, rng = sim_block_and_batch(options, seed=1)
    e = block.embeddings(batch)
    del e["long_unmasked"]  # read_long_history would prefer it to the variable below
    target = tf.Variable(e["target"])
    long = tf.Variable(e["long"])
    weights = [tf.constant(rng.normal(size=shape), tf.float32) for shape in ((6, 8), (6, 16))]

    def both(read):
        with tf.GradientTape() as tape:
            pooled, selection, exact = read(dict(e, target=target, long=long))
            loss = (tf.reduce_sum(pooled * weights[0][:, :8]) +
                    tf.reduce_sum(exact * weights[1][:, :16]))
        return (pooled, selection, exact), tape.gradient(loss, [target, long])

    def by_blocks(e):
        pooled = block.long_attention(e["target"], e["long"], e["long_mask"])
        selection = block.search.selection_mask(
            e["target"], e["long"], e["long_mask"], target_category=e["target_search_key"],
            history_categories=e["long_search_keys"])
        return pooled, selection, block.exact_search(e["target"], e["long"], selection)

    graph = tf.function(block.read_long_history).get_concrete_function(e).graph
    reads = [op for op in graph.get_operations() if op.type == "SimMerlinDotAttention"]
    assert [op.get_attr("normalize") for op in reads] == ([] if plain else [[True, True, False]])
    (fused, fused_grads), (blocks, block_grads) = both(block.read_long_history), both(by_blocks)
    assert fused[0].shape == (6, 8) and fused[2].shape == (6, 16)
    np.testing.assert_array_equal(fused[1].numpy(), blocks[1].numpy())
    assert fused[1].numpy().sum() > 0 and not fused[1].numpy().all()
    for got, want in zip([fused[0], fused[2], *fused_grads], [blocks[0], blocks[2], *block_grads]):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("options", [{"reference_compatible": True},
                                     {"search_mode": "hard", "esu_attention": "dot"}])
def test_sim_reads_the_long_history_unmasked_with_the_same_values_and_gradients(options):
    # The dot-product ESU path weights padded steps by exactly zero, so SIM reads the long
    # history without zeroing them first ("long_unmasked"): the same outputs and the same
    # gradient into the item table as with the masked history.
    block, batch, rng = sim_block_and_batch(options, seed=2)
    block(batch)
    table = block.embeddings.tables["item_id"].embeddings
    weights = tf.constant(rng.normal(size=(6, 16)), tf.float32)
    assert block._weights_long_history()

    def read(unmasked):
        with tf.GradientTape() as tape:
            e = block.embeddings(batch)
            if not unmasked:
                del e["long_unmasked"]
            pooled, selection, exact = block.read_long_history(e)
            loss = tf.reduce_sum(pooled * weights[:, :8]) + tf.reduce_sum(exact * weights)
        return [pooled, selection, exact], tf.convert_to_tensor(tape.gradient(loss, table))

    (outputs, gradient), (masked_outputs, masked_gradient) = read(True), read(False)
    assert not np.array_equal(block.embeddings(batch)["long_unmasked"].numpy(),
                              block.embeddings(batch)["long"].numpy())  # padding present
    for got, want in zip(outputs + [gradient], masked_outputs + [masked_gradient]):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6, atol=1e-7)
    assert np.abs(gradient.numpy()).sum() > 0


@pytest.mark.parametrize("options", [{"reference_compatible": True}, {"attention": "din"},
                                     {"attention": "din", "normalize": True}])
@pytest.mark.parametrize("plain", [False, True])
def test_din_reads_the_history_unmasked_with_the_same_values_and_gradients(options, plain):
    # DIN's attention weights padded steps by exactly zero (fused dot-product op or TensorFlow
    # ops), so it reads the history without zeroing them first: the logit and the gradients of
    # every variable are those computed from the zeroed history.
    from sim_merlin.kernels import model_ops

    schema = sample_schema({"item_id": 60, "category_id": 7}, {"user_id": 30}, 12)
    rng = np.random.default_rng(4)
    history = rng.integers(1, 60, (8, 12))
    history[:, :5] = 0  # left padding
    history[3] = 0      # a row without any behaviour
    batch = {"user_id": tf.constant(rng.integers(1, 30, 8)),
             "item_id": tf.constant(rng.integers(1, 60, 8)),
             "category_id": tf.constant(rng.integers(1, 7, 8)),
             "item_id_history": tf.constant(history),
             "category_id_history": tf.constant(np.where(history > 0, history % 7, 0))}
    block = DINBlock(schema, embedding_dim=4, **options)
    block(batch)
    weights = tf.constant(rng.normal(size=(8, 1)), tf.float32)

    def run(unmasked):
        embeddings = block.embeddings
        original = embeddings.call

        def call(inputs, outputs=None, training=False):
            out = original(inputs, outputs=("user", "target", "history", "history_unmasked",
                                            "history_mask"), training=training)
            if not unmasked:
                out["history_unmasked"] = out["history"]
            return out

        embeddings.call = call
        try:
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(block(batch) * weights)
            grads = tape.gradient(loss, block.trainable_variables)
        finally:
            embeddings.call = original
        return [loss] + [tf.convert_to_tensor(g) for g in grads]

    context = model_ops.plain_ops() if plain else contextlib.nullcontext()
    with context:
        got, want = run(True), run(False)
    both = block.embeddings(batch, outputs=("history", "history_unmasked"))
    assert not np.array_equal(both["history_unmasked"].numpy(), both["history"].numpy())
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-6, atol=1e-7)
    assert all(np.abs(g.numpy()).sum() > 0 for g in got[1:])
