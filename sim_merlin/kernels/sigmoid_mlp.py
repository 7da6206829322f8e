"""DIEN's sigmoid MLPs (auxiliary tower, attention unit) as one op each way.

:func:`sigmoid_mlp` runs a whole MLP with sigmoid activations (a sigmoid after the first layer,
dense layers with sigmoids, then a linear output layer) over blocks of rows in one C++ pass; its
gradient is one op as well. Its first layer comes in two parts, as both callers compute it: rows
come in groups that share a part of the pre-activation (the auxiliary tower's state between a
positive and a negative pair, the attention unit's query between a sample's steps), so
``pre_n = inputs_n @ first_kernel + shared_{n // group}``; without ``inputs``, ``shared`` is the
whole pre-activation. The hidden products are float32, or, for bfloat16 inputs
(``mixed_bfloat16``), bfloat16 products with float32 sums, as TensorFlow's own products under that
policy; the output layer's product is float32. Inputs and their gradients keep their dtype (no
cast op over them); the result is float32. The blocks use it where
:func:`sim_merlin.kernels.model_ops.available` holds.

Example::

    >>> import sim_merlin.tf_compat  # noqa: F401
    >>> import tensorflow as tf
    >>> from sim_merlin.kernels import model_ops, sigmoid_mlp
    >>> if model_ops.available():
    ...     scores = sigmoid_mlp.sigmoid_mlp(tf.zeros([5, 4]), [tf.ones([4, 3]), tf.ones([3, 1])],
    ...                                      [tf.zeros([3]), tf.zeros([1])])
    ...     # a_0 = sigmoid(0) = 0.5; a_1 = sigmoid(4 * 0.5); output 3 * a_1
    ...     assert scores.shape == (5, 1)
    ...     assert abs(float(scores[0, 0]) - 3 / (1 + 2.718281828**-2)) < 1e-4
    ...     # two rows per group: pre = x W + shared (the same shared row for both)
    ...     paired = sigmoid_mlp.sigmoid_mlp(tf.zeros([2, 4]), [tf.ones([4, 1])], [tf.zeros([1])],
    ...                                      inputs=tf.ones([4, 2]), first_kernel=tf.zeros([2, 4]))
    ...     assert paired.shape == (4, 1)
"""
from __future__ import annotations

import sim_merlin.tf_compat  # noqa: F401
import tensorflow as tf

from sim_merlin.kernels.build import load as _library, threads as _threads
from sim_merlin.kernels.recurrent import model_dtype


def sigmoid_mlp(shared, kernels, biases, inputs=None, first_kernel=None):
    """``a = sigmoid(pre)``, then ``a = sigmoid(a @ K + b)`` for each (K, b) but the last, then
    ``a @ K_last + b_last`` -> [rows, K_last's columns], float32.

    ``pre`` is ``shared`` [rows, H_0] without ``inputs``; with ``inputs`` [rows, D] and
    ``first_kernel`` [D, H_0], row n's is ``inputs[n] @ first_kernel + shared[n // g]`` where
    ``shared`` [rows / g, H_0] has one row per group of g consecutive rows. ``kernels[i]`` [H_i,
    H_{i+1}]; ``biases[i]`` [H_{i+1}].
    """
    if len(kernels) != len(biases) or not kernels:
        raise ValueError(f"sigmoid_mlp needs as many biases as kernels (at least one), got "
                         f"{len(kernels)} kernels and {len(biases)} biases")
    if (inputs is None) != (first_kernel is None):
        raise ValueError("sigmoid_mlp takes inputs and first_kernel together")
    shared = model_dtype(shared)
    if inputs is None:
        inputs = tf.zeros(tf.stack([tf.shape(shared)[0], 0]), shared.dtype)
        first_kernel = tf.zeros(tf.stack([0, tf.shape(shared)[1]]), tf.float32)
    as_float32 = lambda ts: [tf.cast(t, tf.float32) for t in ts]  # noqa: E731
    return _library().sim_merlin_sigmoid_mlp(
        tf.cast(inputs, shared.dtype), shared, tf.cast(first_kernel, tf.float32),
        as_float32(kernels), as_float32([tf.reshape(b, [-1]) for b in biases]),
        bf16_products=shared.dtype == tf.bfloat16, threads=_threads())


@tf.RegisterGradient("SimMerlinSigmoidMlp")
def _sigmoid_mlp_gradient(op, outputs_grad):
    layers = op.get_attr("layers")
    x_grad, shared_grad, first_grad, kernel_grads, bias_grads = (
        _library().sim_merlin_sigmoid_mlp_grad(
            *op.inputs[:3], op.inputs[3:3 + layers], op.inputs[3 + layers:], outputs_grad,
            bf16_products=op.get_attr("bf16_products"), threads=op.get_attr("threads")))
    return [x_grad, shared_grad, first_grad, *kernel_grads, *bias_grads]


def keras_layers(shared, layers, inputs=None, first_kernel=None):
    """:func:`sigmoid_mlp` with the weights of Keras ``Dense`` layers (those after the first),
    building those not yet built (the first takes the pre-activation's width). Their activations
    are not read: callers use it where all but the last are sigmoids and the last is linear."""
    kernels, biases, width = [], [], shared.shape[-1]
    for layer in layers:
        if not layer.built:
            with tf.init_scope():
                layer.build(tf.TensorShape([None, width]))
        kernels.append(layer.kernel)
        biases.append(layer.bias)
        width = layer.units
    return sigmoid_mlp(shared, kernels, biases, inputs, first_kernel)
