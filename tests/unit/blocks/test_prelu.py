"""The PReLU layer: Keras's values and gradients on the fused and the plain path (float32 and
mixed bfloat16), the fused op in the towers' graphs, config and weights round trips."""
import numpy as np
import pytest
import tensorflow as tf

from sim_merlin.blocks.mlp import LogitMLP
from sim_merlin.blocks.prelu import PReLU
from sim_merlin.kernels import model_ops

pytestmark = pytest.mark.compat_lock


def _values_and_gradients(layer, x, dy):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
    dx, dalpha = tape.gradient(y, [x, layer.alpha], output_gradients=dy)
    return [np.asarray(tf.cast(t, tf.float32)) for t in (y, dx, dalpha)]


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
@pytest.mark.parametrize("plain", [False, True])
def test_same_as_keras_prelu(policy, plain):
    previous = tf.keras.mixed_precision.global_policy()
    tf.keras.mixed_precision.set_global_policy(policy)
    try:
        rng = np.random.default_rng(1)
        ours = PReLU(alpha_initializer=tf.keras.initializers.Constant(0.1))
        keras = tf.keras.layers.PReLU()
        dtype = tf.bfloat16 if policy == "mixed_bfloat16" else tf.float32
        x = tf.cast(tf.constant(rng.normal(size=(512, 40)).astype(np.float32)), dtype)
        dy = tf.cast(tf.constant(rng.normal(size=(512, 40)).astype(np.float32)), dtype)
        ours.build(x.shape)
        keras.build(x.shape)
        assert [w.shape for w in ours.weights] == [w.shape for w in keras.weights] == [[40]]
        np.testing.assert_allclose(ours.alpha.numpy(), 0.1)
        keras.alpha.assign(rng.normal(size=40).astype(np.float32))
        ours.set_weights(keras.get_weights())
        if plain:
            with model_ops.plain_ops():
                got = _values_and_gradients(ours, x, dy)
        else:
            got = _values_and_gradients(ours, x, dy)
        want = _values_and_gradients(keras, x, dy)
    finally:
        tf.keras.mixed_precision.set_global_policy(previous)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert got[2].dtype == np.float32
    np.testing.assert_allclose(got[2], want[2], rtol=2.0 ** -7, atol=1e-4)


def test_towers_use_the_fused_op_and_keep_their_weights():
    tower = LogitMLP([16, 8])
    graph = tf.function(lambda x: tower(x)).get_concrete_function(
        tf.TensorSpec([None, 10], tf.float32)).graph
    ops = {op.type for op in graph.get_operations()}
    assert ("SimMerlinPrelu" in ops) == model_ops.available()
    with model_ops.plain_ops():
        plain = tf.function(lambda x: tower(x)).get_concrete_function(
            tf.TensorSpec([None, 10], tf.float32)).graph
    assert "SimMerlinPrelu" not in {op.type for op in plain.get_operations()}
    names = [w.name for w in tower.weights]
    assert any("prelu_0/alpha" in n for n in names) and any("prelu_1/alpha" in n for n in names)
    x = tf.ones([3, 10])
    revived = tf.keras.layers.deserialize(tf.keras.layers.serialize(tower))
    revived(x)
    revived.set_weights(tower.get_weights())
    assert isinstance(revived.hidden[1], PReLU)
    np.testing.assert_array_equal(revived(x).numpy(), tower(x).numpy())
