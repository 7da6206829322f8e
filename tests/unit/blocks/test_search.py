import numpy as np
import pytest
import tensorflow as tf

from sim_merlin.blocks.search import GeneralSearchUnit

pytestmark = pytest.mark.compat_lock


def _history(seed=0, batch=6, length=12, dim=3):
    rng = np.random.default_rng(seed)
    query = rng.normal(size=(batch, dim)).astype(np.float32)
    lengths = np.array([12, 7, 3, 0, 1, 9])[:batch]
    mask = np.arange(length)[None, :] >= length - lengths[:, None]
    history = rng.normal(size=(batch, length, dim)).astype(np.float32) * mask[..., None]
    categories = rng.integers(1, 4, size=(batch, length)) * mask
    target_category = rng.integers(1, 4, size=batch)
    return query, history, mask, categories, target_category


@pytest.mark.parametrize("top_k", [1, 4, 12, 20])
def test_soft_search_picks_exactly_the_top_k_scores(top_k):
    query, history, mask, *_ = _history()
    selected, picked, indices = GeneralSearchUnit("soft", top_k)(
        query, history, mask.astype(np.float32), return_indices=True)
    assert selected.shape == (6, top_k, 3) and picked.shape == (6, top_k)
    scores = (history * query[:, None, :]).sum(-1)
    for b in range(len(query)):
        valid = np.flatnonzero(mask[b])
        want = valid[np.argsort(-scores[b, valid], kind="stable")][:top_k]
        got = indices.numpy()[b][picked.numpy()[b]]
        assert got.tolist() == want.tolist()
        np.testing.assert_allclose(selected.numpy()[b, : len(want)], history[b, want])
        assert (selected.numpy()[b, len(want):] == 0).all()
        assert (indices.numpy()[b, len(want):] == -1).all()


@pytest.mark.parametrize("top_k", [2, 5, 15])
def test_hard_search_picks_matching_categories_most_recent_first(top_k):
    query, history, mask, categories, target = _history(1)
    selected, picked, indices = GeneralSearchUnit("hard", top_k)(
        query, history, mask, target_category=target, history_categories=categories,
        return_indices=True)
    for b in range(len(query)):
        matching = [t for t in range(history.shape[1]) if mask[b, t] and categories[b, t] == target[b]]
        want = matching[::-1][:top_k]
        assert indices.numpy()[b][: len(want)].tolist() == want
        assert picked.numpy()[b].tolist() == [True] * len(want) + [False] * (top_k - len(want))
        np.testing.assert_allclose(selected.numpy()[b, : len(want)], history[b, want])
        assert (selected.numpy()[b, len(want):] == 0).all()


def test_selection_has_no_gradient_but_the_selected_embeddings_do():
    query, history, mask, *_ = _history(2)
    history_var = tf.Variable(history)
    query_var = tf.Variable(query)
    gsu = GeneralSearchUnit("soft", 4)
    with tf.GradientTape() as tape:
        selected, picked, indices = gsu(query_var, history_var, mask, return_indices=True)
        loss = tf.reduce_sum(selected)
    grad_history, grad_query = tape.gradient(loss, [history_var, query_var])
    assert grad_query is None  # the ranking does not propagate gradients
    grad = grad_history.numpy()
    chosen = np.zeros_like(mask)
    for b, row in enumerate(indices.numpy()):
        chosen[b, row[row >= 0]] = True
    assert (grad[chosen] == 1).all() and (grad[~chosen] == 0).all()


def test_ragged_history_and_graph_mode_match_dense_eager():
    query, history, mask, categories, target = _history(3)
    lengths = mask.sum(1)
    ragged = tf.ragged.constant(
        [history[b, history.shape[1] - n :].tolist() for b, n in enumerate(lengths)],
        ragged_rank=1, inner_shape=(3,))
    ragged_categories = tf.ragged.constant(
        [categories[b, categories.shape[1] - n :].tolist() for b, n in enumerate(lengths)])
    gsu = GeneralSearchUnit("hard", 3)
    dense = gsu(query, history, mask, target_category=target, history_categories=categories)
    from_ragged = gsu(query, ragged, target_category=target, history_categories=ragged_categories)
    graph = tf.function(lambda q, h, m, t, c: gsu(q, h, m, target_category=t, history_categories=c))(
        query, history, mask, target, categories)
    for got in (from_ragged, graph):
        np.testing.assert_allclose(got[0].numpy(), dense[0].numpy())
        np.testing.assert_array_equal(got[1].numpy(), dense[1].numpy())


def test_config_round_trip_and_validation():
    gsu = GeneralSearchUnit("hard", 7)
    clone = tf.keras.layers.deserialize(tf.keras.layers.serialize(gsu))
    assert type(clone) is GeneralSearchUnit and (clone.mode, clone.top_k) == ("hard", 7)
    with pytest.raises(ValueError, match="mode must be one of"):
        GeneralSearchUnit("fuzzy")
    with pytest.raises(ValueError, match="hard search needs"):
        GeneralSearchUnit("hard", 2)(tf.ones([1, 2]), tf.ones([1, 3, 2]), tf.ones([1, 3]))


@pytest.mark.parametrize("mode", ["soft", "hard"])
@pytest.mark.parametrize("top_k", [1, 4, 20])
@pytest.mark.parametrize("plain", [False, True])  # the fused top-k mask op, or TensorFlow's ops
def test_selection_mask_marks_the_selected_positions_and_esu_agrees(mode, top_k, plain):
    """selection_mask is the set of positions call() selects, and SIM's ESU gives the same
    output over the mask as over the gathered selection (it is order-free)."""
    from sim_merlin.blocks.exact_search import ExactSearchUnit
    from sim_merlin.kernels import model_ops

    query, history, mask, categories, target_category = _history(seed=3)
    unit = GeneralSearchUnit(mode, top_k)
    args = dict(target_category=target_category, history_categories=categories)
    selected, picked, indices = unit(query, history, mask, return_indices=True, **args)
    if plain:
        with model_ops.plain_ops():
            selection = unit.selection_mask(query, history, mask, **args).numpy()
    else:
        assert model_ops.available()
        selection = unit.selection_mask(query, history, mask, **args).numpy()
    want = np.zeros_like(selection)
    for b, row in enumerate(indices.numpy()):
        want[b, row[row >= 0]] = True
    np.testing.assert_array_equal(selection, want)
    for attention in ("dot", "multihead"):
        esu = ExactSearchUnit(attention, heads=1, mean_denominator="count_plus_one")
        over_selection = esu(query, selected, picked).numpy()
        over_mask = esu(query, history, selection).numpy()
        np.testing.assert_allclose(over_mask, over_selection, rtol=1e-5, atol=1e-6)
