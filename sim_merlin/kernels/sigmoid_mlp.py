"""The sigmoid MLPs of DIEN (auxiliary tower, attention unit) after their first product, as one op.

:func:`sigmoid_mlp` takes the first hidden layer's pre-activation (the callers compute that
product themselves, sharing a part of it between rows) and runs the rest of the MLP (a sigmoid,
then dense layers with sigmoids, then a linear output layer) over blocks of rows in one C++ pass;
its gradient is one op as well. The hidden products are float32, or, for a bfloat16
pre-activation (``mixed_bfloat16``), bfloat16 products with float32 sums, as TensorFlow's own
products under that policy; the output layer's product is float32. The pre-activation and its
gradient keep their dtype (no cast op over them); the result is float32. The
blocks use it where :func:`sim_merlin.kernels.model_ops.available` holds.

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
"""
from __future__ import annotations

import sim_merlin.tf_compat  # noqa: F401
import tensorflow as tf

from sim_merlin.kernels.build import load as _library, threads as _threads
from sim_merlin.kernels.recurrent import model_dtype


def sigmoid_mlp(pre_activation, kernels, biases):
    """``a = sigmoid(pre_activation)``, then ``a = sigmoid(a @ K + b)`` for each (K, b) but the
    last, then ``a @ K_last + b_last`` -> [rows, K_last's columns], float32.

    ``pre_activation`` [rows, H_0]; ``kernels[i]`` [H_i, H_{i+1}]; ``biases[i]`` [H_{i+1}].
    """
    if len(kernels) != len(biases) or not kernels:
        raise ValueError(f"sigmoid_mlp needs as many biases as kernels (at least one), got "
                         f"{len(kernels)} kernels and {len(biases)} biases")
    as_float32 = lambda ts: [tf.cast(t, tf.float32) for t in ts]  # noqa: E731
    return _library().sim_merlin_sigmoid_mlp(
        model_dtype(pre_activation), as_float32(kernels),
        as_float32([tf.reshape(b, [-1]) for b in biases]),
        bf16_products=pre_activation.dtype == tf.bfloat16, threads=_threads())


@tf.RegisterGradient("SimMerlinSigmoidMlp")
def _sigmoid_mlp_gradient(op, outputs_grad):
    layers = op.get_attr("layers")
    pre_grad, kernel_grads, bias_grads = _library().sim_merlin_sigmoid_mlp_grad(
        op.inputs[0], op.inputs[1:1 + layers], op.inputs[1 + layers:], outputs_grad,
        bf16_products=op.get_attr("bf16_products"), threads=op.get_attr("threads"))
    return [pre_grad, *kernel_grads, *bias_grads]


def keras_layers(pre_activation, layers):
    """:func:`sigmoid_mlp` with the weights of Keras ``Dense`` layers, building those not yet
    built (the first takes the pre-activation's width). Their activations are not read: callers
    use it where all but the last are sigmoids and the last is linear."""
    kernels, biases, width = [], [], pre_activation.shape[-1]
    for layer in layers:
        if not layer.built:
            with tf.init_scope():
                layer.build(tf.TensorShape([None, width]))
        kernels.append(layer.kernel)
        biases.append(layer.bias)
        width = layer.units
    return sigmoid_mlp(pre_activation, kernels, biases)
