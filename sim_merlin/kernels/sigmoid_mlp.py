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

:func:`sigmoid_mlp_logistic_loss` is an MLP with one logit per row and a weighted logistic loss
over it (DIEN's auxiliary loss), computed with its gradients in one op: in a training step the MLP
then runs once instead of forward and again inside its gradient op.

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
    ...     # logits 0: each row's logistic loss is log 2, weighted 0.25 each
    ...     loss = sigmoid_mlp.sigmoid_mlp_logistic_loss(
    ...         tf.zeros([4, 2]), [tf.ones([2, 3]), tf.zeros([3, 1])],
    ...         [tf.zeros([3]), tf.zeros([1])], labels=[1.0, 0.0, 1.0, 0.0], weights=tf.fill([4], 0.25))
    ...     assert abs(float(loss) - 0.6931472) < 1e-6
"""
from __future__ import annotations

import sim_merlin.tf_compat  # noqa: F401
import tensorflow as tf

from sim_merlin.kernels.build import load as _library, threads as _threads
from sim_merlin.kernels.recurrent import model_dtype


def _op_inputs(inputs, kernels, biases, groups, group_kernel, product_kernel):
    """The ops' first inputs: x, g, W_g, W_p, kernels, biases (absent parts as empty tensors)."""
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
    return [inputs, tf.cast(groups, inputs.dtype), *as_float32([group_kernel, product_kernel]),
            as_float32(kernels), as_float32([tf.reshape(b, [-1]) for b in biases])]


def sigmoid_mlp(inputs, kernels, biases, groups=None, group_kernel=None, product_kernel=None):
    """``a = sigmoid(a @ K_i + b_i)`` for each (K_i, b_i) but the last, from ``a = inputs``, then
    ``a @ K_last + b_last`` -> [rows, K_last's columns], float32.

    ``inputs`` x [rows, D]; ``kernels[i]`` [H_{i-1}, H_i] (``kernels[0]`` [D, H_0]);
    ``biases[i]`` [H_i]. With ``groups`` g [rows / r, G] (one row per group of r consecutive
    rows), the first layer adds ``g[n // r] @ group_kernel`` ([G, H_0]) to row n and, with
    ``product_kernel`` ([D, H_0]; then G = D), ``(x[n] * g[n // r]) @ product_kernel``.
    """
    args = _op_inputs(inputs, kernels, biases, groups, group_kernel, product_kernel)
    return _library().sim_merlin_sigmoid_mlp(
        *args, bf16_products=args[0].dtype == tf.bfloat16, threads=_threads())


def sigmoid_mlp_logistic_loss(inputs, kernels, biases, labels, weights, groups=None,
                              group_kernel=None, product_kernel=None, epsilon=0.0,
                              group_steps=0):
    """The weighted logistic loss of :func:`sigmoid_mlp`'s logits z [rows, 1], a scalar:
    ``sum_n weights[n] * l(z_n, labels[n])`` with ``l = y softplus(-z) + (1 - y) softplus(z)``
    (``epsilon`` 0), or the reference DIEN's ``-y log(sigmoid(z) + epsilon) - (1 - y) log(1 -
    sigmoid(z) - epsilon)``. ``labels`` and ``weights`` [rows] (no gradient flows to them).

    One op computes the loss and its gradients together (the MLP runs once per training step
    instead of forward and again in its gradient op); the gradient scales them by the loss's
    incoming gradient. The same function as :func:`sigmoid_mlp` followed by that loss in
    TensorFlow ops, up to float32 rounding; use it where a gradient will be taken (it does the
    backward work even when none is).

    ``group_steps`` S > 1: ``groups`` holds samples of S rows of which the first S - 1 are the
    groups (each sample's last row is in none; its gradient is zero): the loss of ``groups``
    ``[M * S, G]`` equals that of its rows without each sample's last, with no copy made.
    """
    if group_steps > 1 and groups is None:
        raise ValueError("group_steps needs groups")
    args = _op_inputs(inputs, kernels, biases, groups, group_kernel, product_kernel)
    *_, loss = _library().sim_merlin_sigmoid_mlp_logistic_loss(
        *args, tf.reshape(tf.cast(labels, tf.float32), [-1]),
        tf.reshape(tf.cast(weights, tf.float32), [-1]), epsilon=float(epsilon),
        group_steps=int(group_steps), bf16_products=args[0].dtype == tf.bfloat16,
        threads=_threads())
    return loss


@tf.RegisterGradient("SimMerlinSigmoidMlpLogisticLoss")
def _logistic_loss_gradient(op, *output_grads):
    layers = op.get_attr("layers")
    scale = output_grads[-1]  # the loss's; the other outputs are its gradients (no gradient)

    def scaled(gradient):  # exact and free when the scale is 1, as in a plain training step
        return tf.cond(tf.equal(scale, 1.0), lambda: gradient,
                       lambda: gradient * tf.cast(scale, gradient.dtype))

    return [scaled(g) for g in op.outputs[:4 + 2 * layers]] + [None, None]


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
