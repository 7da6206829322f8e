import numpy as np
import pytest
import tensorflow as tf

from sim_merlin.blocks.interest import AUGRUCell, AuxiliaryLoss, InterestEvolution, InterestExtractor

pytestmark = pytest.mark.compat_lock
sigmoid = lambda x: 1 / (1 + np.exp(-x))


def _numpy_augru(cell, x, a, mask=None):
    wg, bg = cell.gates.kernel.numpy(), cell.gates.bias.numpy()
    wc, bc = cell.candidate.kernel.numpy(), cell.candidate.bias.numpy()
    state = np.zeros((x.shape[0], cell.units), np.float32)
    for t in range(x.shape[1]):
        gates = sigmoid(np.concatenate([x[:, t], state], -1) @ wg + bg)
        r, u = gates[:, : cell.units], gates[:, cell.units :]
        c = np.tanh(np.concatenate([x[:, t], r * state], -1) @ wc + bc)
        u = (1 - a[:, t : t + 1]) * u
        new = u * state + (1 - u) * c
        state = new if mask is None else np.where(mask[:, t : t + 1], new, state)
    return state


def test_augru_step_equations_and_masked_steps_keep_the_state():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 6, 4)).astype(np.float32)
    a = rng.uniform(size=(3, 6)).astype(np.float32)
    mask = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [1, 1, 0, 1, 0, 1]], bool)
    cell = AUGRUCell(5)
    rnn = tf.keras.layers.RNN(cell)
    steps = np.concatenate([x, a[..., None]], -1)
    unmasked = rnn(steps).numpy()
    np.testing.assert_allclose(unmasked, _numpy_augru(cell, x, a), rtol=1e-5, atol=1e-6)
    masked = rnn(steps, mask=tf.constant(mask)).numpy()
    np.testing.assert_allclose(masked, _numpy_augru(cell, x, a, mask), rtol=1e-5, atol=1e-6)
    # Masked steps change nothing: row 2 equals running only its valid steps.
    keep = mask[2]
    only_valid = rnn(steps[2:3, keep]).numpy()
    np.testing.assert_allclose(masked[2:3], only_valid, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cell.gates.bias.numpy(), 1.0)
    # a = 1 moves the state fully to the candidate; a = 0 is a plain GRU step.
    one = _numpy_augru(cell, x[:, :1], np.ones((3, 1), np.float32))
    c = np.tanh(np.concatenate([x[:, 0], np.zeros((3, 5))], -1) @ cell.candidate.kernel.numpy()
                + cell.candidate.bias.numpy())
    np.testing.assert_allclose(one, c, rtol=1e-5, atol=1e-6)


def test_interest_extractor_ignores_left_padding():
    rng = np.random.default_rng(1)
    sequence = rng.normal(size=(2, 7, 3)).astype(np.float32)
    mask = np.array([[0, 0, 0, 1, 1, 1, 1], [1] * 7], bool)
    extractor = InterestExtractor(4)
    states = extractor(sequence, mask).numpy()
    assert (states[0, :3] == 0).all()  # nothing seen yet
    alone = extractor(sequence[:1, 3:], np.ones((1, 4), bool)).numpy()
    np.testing.assert_allclose(states[0, 3:], alone[0], rtol=1e-5, atol=1e-6)
    reference = InterestExtractor(4, use_mask=False)
    reference(sequence, mask)
    reference.set_weights(extractor.get_weights())
    assert not np.allclose(reference(sequence, mask).numpy()[0, 3:], alone[0])


def test_interest_evolution_runs_the_augru_on_attention_scores():
    rng = np.random.default_rng(2)
    states = rng.normal(size=(3, 5, 6)).astype(np.float32)
    query = rng.normal(size=(3, 8)).astype(np.float32)
    mask = np.array([[0, 0, 1, 1, 1], [1] * 5, [0] * 5], bool)
    evolution = InterestEvolution(6, attention_units=(4,))
    final, weights = evolution(query, states, mask, return_weights=True)
    assert final.shape == (3, 6) and weights.shape == (3, 5)
    np.testing.assert_allclose(weights.numpy().sum(1), [1, 1, 0], atol=1e-6)
    assert (weights.numpy()[~mask] == 0).all()
    want = _numpy_augru(evolution.augru.cell, states, weights.numpy(), mask)
    np.testing.assert_allclose(final.numpy(), want, rtol=1e-5, atol=1e-6)
    assert (final.numpy()[2] == 0).all()  # all padding: the initial state
    graph = tf.function(lambda q, s, m: evolution(q, s, m))(query, states, mask)
    np.testing.assert_allclose(graph.numpy(), final.numpy(), rtol=1e-5, atol=1e-6)


def test_auxiliary_loss_on_a_hand_built_batch():
    rng = np.random.default_rng(3)
    states = rng.normal(size=(2, 4, 3)).astype(np.float32)
    positive = rng.normal(size=(2, 4, 2)).astype(np.float32)
    negative = rng.normal(size=(2, 4, 2)).astype(np.float32)
    mask = np.array([[0, 1, 1, 1], [1, 1, 1, 1]], np.float32)
    loss_layer = AuxiliaryLoss(hidden_units=(5,))
    loss = float(loss_layer(states, positive, negative, mask))
    (w1, b1), (w2, b2) = [(d.kernel.numpy(), d.bias.numpy()) for d in loss_layer.scorer_layers]
    score = lambda s, e: (sigmoid(np.concatenate([s, e], -1) @ w1 + b1) @ w2 + b2)[..., 0]
    terms = []
    for b in range(2):
        for t in range(3):
            if mask[b, t] and mask[b, t + 1]:
                zp, zn = score(states[b, t], positive[b, t + 1]), score(states[b, t], negative[b, t + 1])
                terms.append(-np.log(sigmoid(zp)) - np.log(1 - sigmoid(zn)))
    assert len(terms) == 5
    assert loss == pytest.approx(np.mean(terms), rel=1e-5)
    reference = AuxiliaryLoss(hidden_units=(5,), reference_compatible=True)
    reference(states, positive, negative, mask)
    reference.set_weights(loss_layer.get_weights())
    ref_terms = [
        mask[b, t + 1] * (-np.log(sigmoid(score(states[b, t], positive[b, t + 1])) + 1e-6)
                          - np.log(1 - sigmoid(score(states[b, t], negative[b, t + 1])) - 1e-6))
        for b in range(2) for t in range(3)
    ]
    assert float(reference(states, positive, negative, mask)) == pytest.approx(np.mean(ref_terms), rel=1e-5)


def test_auxiliary_loss_stays_finite_when_saturated_and_on_empty_histories():
    layer = AuxiliaryLoss(hidden_units=(2,))
    states = tf.fill([1, 3, 2], 1e4)
    loss = layer(states, tf.fill([1, 3, 2], 1e4), tf.fill([1, 3, 2], -1e4), tf.ones([1, 3]))
    assert np.isfinite(float(loss))
    assert float(layer(states, states, states, tf.zeros([1, 3]))) == 0.0


@pytest.mark.parametrize("layer", [AUGRUCell(3), InterestExtractor(3, use_mask=False),
                                   InterestEvolution(3, attention_units=(2,)),
                                   AuxiliaryLoss((4,), reference_compatible=True)])
def test_blocks_round_trip_through_keras_serialization(layer):
    revived = tf.keras.layers.deserialize(tf.keras.layers.serialize(layer))
    assert type(revived) is type(layer)
    assert revived.get_config() == layer.get_config()


@pytest.mark.parametrize("use_mask", [True, False])
def test_unrolled_recurrences_match_keras_values_and_gradients(use_mask):
    """The unrolled GRU and AUGRU compute what Keras's GRU and RNN(AUGRUCell) compute, with
    the same weights, forward and backward."""
    rng = np.random.default_rng(7)
    sequence = tf.constant(rng.normal(size=(4, 6, 3)).astype(np.float32))
    scores = tf.constant(rng.uniform(size=(4, 6)).astype(np.float32))
    mask = tf.constant(np.array([[0, 0, 1, 1, 1, 1], [1] * 6, [1, 0, 1, 0, 1, 1], [0] * 6], bool))
    keras_mask = mask if use_mask else None

    extractor = InterestExtractor(5, use_mask=use_mask)
    keras_gru = tf.keras.layers.GRU(5, return_sequences=True)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(sequence)
        ours = extractor(sequence, mask)
        keras_gru(sequence)
        keras_gru.set_weights(extractor.gru.get_weights())
        theirs = keras_gru(sequence, mask=keras_mask)
        loss_ours = tf.reduce_sum(ours * tf.range(5.0))
        loss_theirs = tf.reduce_sum(theirs * tf.range(5.0))
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-5, atol=1e-6)
    for a, b in zip(tape.gradient(loss_ours, [sequence, *extractor.trainable_variables]),
                    tape.gradient(loss_theirs, [sequence, *keras_gru.trainable_variables])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)

    cell = AUGRUCell(5)
    rnn = tf.keras.layers.RNN(cell)
    from sim_merlin.blocks.interest import unrolled_augru

    with tf.GradientTape(persistent=True) as tape:
        tape.watch([sequence, scores])
        theirs = rnn(tf.concat([sequence, scores[..., None]], -1), mask=keras_mask)
        ours = unrolled_augru(sequence, scores, mask if use_mask else None, cell)
        loss_ours, loss_theirs = tf.reduce_sum(ours ** 2), tf.reduce_sum(theirs ** 2)
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-5, atol=1e-6)
    wrt = [sequence, scores, *cell.trainable_variables]
    for a, b in zip(tape.gradient(loss_ours, wrt), tape.gradient(loss_theirs, wrt)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
