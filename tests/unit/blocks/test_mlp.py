import numpy as np
import pytest
import tensorflow as tf

from sim_merlin.blocks.mlp import LogitMLP

pytestmark = pytest.mark.compat_lock


def test_prelu_tower_matches_numpy_and_counts_parameters():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 80)).astype(np.float32)
    tower = LogitMLP([200])
    out = tower(x).numpy()
    dense, prelu, logit = tower.hidden[0], tower.hidden[1], tower.output_layer
    np.testing.assert_allclose(prelu.alpha.numpy(), 0.1)
    h = x @ dense.kernel.numpy() + dense.bias.numpy()
    h = np.where(h > 0, h, prelu.alpha.numpy() * h)
    np.testing.assert_allclose(out, h @ logit.kernel.numpy() + logit.bias.numpy(), rtol=1e-5, atol=1e-5)
    # The reference's stage-one MLP: 80 -> 200 (PReLU) -> 1.
    assert tower.count_params() == 80 * 200 + 200 + 200 + 200 + 1


def test_dropout_only_in_training_and_serialization():
    tower = LogitMLP([16, 8], dropout_rate=0.5)
    x = tf.ones([64, 10])
    np.testing.assert_allclose(tower(x, training=False).numpy(), tower(x, training=False).numpy())
    assert not np.allclose(tower(x, training=True).numpy(), tower(x, training=False).numpy())
    revived = tf.keras.layers.deserialize(tf.keras.layers.serialize(tower))
    assert revived.get_config() == tower.get_config()
