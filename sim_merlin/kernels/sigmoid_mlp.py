"""DIEN's sigmoid MLPs (auxiliary tower, attention unit) as one op each way.

:func:`sigmoid_mlp` runs a whole MLP (dense layers with sigmoid activations, then a linear output
layer) over blocks of rows in one C++ pass; its gradient is one op as well. Rows may come in
groups that share a part of the first layer's input, as both callers' do (the auxiliary tower's
state between a positive and a negative pair, the attention unit's query between a sample's
steps): that part's product is computed once per group, and DIN's ``[e, q, e - q, e * q]`` input
is taken without its concatenation (a product term ``(x * g) W_p``). The hidden products are
float32, or, for bfloat16 inputs (``mixed_bfloat16``), bfloat16 products with float32 sums, as
TensorFlow's own products under that policy; the output layer's product is float32. Inputs and
their gradients keep their dtype (no cast op over them); the result is float32. The blocks use it
where :func:`sim_merlin.kernels.model_ops.available` holds.

Example::

    >>> import sim_merlin.tf_compat  # noqa: F401
    >>> import tensorflow as tf
    >>> from sim_merlin.kernels import model_ops, sigmoid_mlp
    >>> if model_ops.available():
    ...     scores = sigmoid_mlp.sigmoid_mlp(tf.zeros([5, 2]), [tf.ones([2, 4]), tf.ones([4, 1])],
    ...                                      [tf.zeros([4]), tf.zeros([1])])
    ...     # hidden: sigmoid(0) = 0.5 each; output 4 * 0.5
    ...     assert scores.shape == (5, 1) and abs(float(scores[0, 0]) - 2.0) < 1e-6
    ...     # groups of two rows sharing g: z_0 = x K_0 + g W_g + b_0
    ...     paired = sigmoid_mlp.sigmoid_mlp(
    ...         tf.ones([4, 2]), [tf.zeros([2, 4]), tf.ones([4, 1])], [tf.zeros([4]), tf.zeros([1])],
    ...         groups=tf.zeros([2, 3]), group_kernel=tf.ones([3, 4]))
    ...     assert paired.shape == (4, 1)
"""
from __future__ import annotations

import sim_merlin.tf_compat  # noqa: F401
import tensorflow as tf

from sim_merlin.kernels.build import load as _library, threads as _threads
from sim_merlin.kernels.recurrent import model_dtype


def sigmoid_mlp(inputs, kernels, biases, groups=None, group_kernel=None, product_kernel=None):
    """``a = sigmoid(a @ K_i + b_i)`` for each (K_i, b_i) but the last, from ``a = inputs``, then
    ``a @ K_last + b_last`` -> [rows, K_last's columns], float32.

    ``inputs`` x [rows, D]; ``kernels[i]`` [H_{i-1}, H_i] (``kernels[0]`` [D, H_0]);
    ``biases[i]`` [H_i]. With ``groups`` g [rows / r, G] (one row per group of r consecutive
    rows), the first layer adds ``g[n // r] @ group_kernel`` ([G, H_0]) to row n and, with
    ``product_kernel`` ([D, H_0]; then G = D), ``(x[n] * g[n // r]) @ product_kernel``.
    """
    if len(kernels) != len(biases) or not kernels:
        raise ValueError(f"sigmoid_mlp needs as many biases as kernels (at least one), got "
                         f"{len(kernels)} kernels and {len(biases)} biases")
    if groups is None and (group_kernel is not None or product_kernel is not None):
        raise ValueError("sigmoid_mlp's group_kernel and product_kernel need groups")
    inputs = model_dtype(inputs)
    first_units = tf.shape(kernels[0])[1]
    if groups is None:  # every row its own group, with nothing shared
        groups = tf.zeros(tf.stack([tf.shape(inputs)[0], 0]), inputs.dtype)
    if group_kernel is None:
        group_kernel = tf.zeros(tf.stack([tf.shape(groups)[1], first_units]))
    if product_kernel is None:
        product_kernel = tf.zeros(tf.stack([0, first_units]))
    as_float32 = lambda ts: [tf.cast(t, tf.float32) for t in ts]  # noqa: E731
    return _library().sim_merlin_sigmoid_mlp(
        inputs, tf.cast(groups, inputs.dtype), *as_float32([group_kernel, product_kernel]),
        as_float32(kernels), as_float32([tf.reshape(b, [-1]) for b in biases]),
        bf16_products=inputs.dtype == tf.bfloat16, threads=_threads())


@tf.RegisterGradient("SimMerlinSigmoidMlp")
def _sigmoid_mlp_gradient(op, outputs_grad):
    layers = op.get_attr("layers")
    *first_grads, kernel_grads, bias_grads = _library().sim_merlin_sigmoid_mlp_grad(
        *op.inputs[:4], op.inputs[4:4 + layers], op.inputs[4 + layers:], outputs_grad,
        bf16_products=op.get_attr("bf16_products"), threads=op.get_attr("threads"))
    return [*first_grads, *kernel_grads, *bias_grads]


def keras_weights(layers, width):
    """The kernels and biases of Keras ``Dense`` layers applied in turn to ``width`` columns,
    building those not yet built. Their activations are not read: callers of
    :func:`sigmoid_mlp` use it where all but the last are sigmoids and the last is linear."""
    kernels, biases = [], []
    for layer in layers:
        if not layer.built:
            with tf.init_scope():
                layer.build(tf.TensorShape([None, width]))
        kernels.append(layer.kernel)
        biases.append(layer.bias)
        width = layer.units
    return kernels, biases
