"""Dot-product attention reads of a masked sequence, forward and gradient as one op each.

The attention the reference uses in DIN and in SIM's exact search unit: scores ``<k_t, q>``, a
softmax over the valid steps, the weighted sum of the keys (:func:`dot_attention`); and SIM's
reads of its long history, several weightings of the same scores at once (:func:`dot_reads`).
In TensorFlow ops each step of it is a pass over the [batch, length, dim] keys, and the keys'
gradient is the sum of several; ``dot_attention.cc`` does each sample in one pass, in float32
(bfloat16 inputs widened, outputs rounded to nearest even). Padded steps get weight exactly 0
and a zero gradient, so the keys need not be zeroed there.

Example::

    >>> import sim_merlin.tf_compat  # noqa: F401
    >>> import tensorflow as tf
    >>> from sim_merlin.kernels import dot_attention, model_ops
    >>> query = tf.constant([[1.0, 0.0]])
    >>> keys = tf.constant([[[2.0, 1.0], [0.0, 3.0], [9.0, 9.0]]])
    >>> mask = tf.constant([[True, True, False]])
    >>> if model_ops.available():
    ...     pooled, weights = dot_attention.dot_attention(query, keys, mask)
    ...     # scores 2 and 0: weights e^2 / (e^2 + 1) and 1 / (e^2 + 1); the padded step 0
    ...     assert abs(float(weights[0, 0]) - 0.8808) < 1e-4 and float(weights[0, 2]) == 0.0
"""
from __future__ import annotations

import sim_merlin.tf_compat  # noqa: F401
import tensorflow as tf

from sim_merlin.kernels.build import load as _library, threads as _threads

DTYPES = (tf.float32, tf.bfloat16)


def dot_reads(query, keys, masks, normalize):
    """(reads [B, H, D], weights [B, H, L]) for ``query`` [B, D], ``keys`` [B, L, D] (float32 or
    bfloat16; the query is cast to the keys' dtype) and ``masks`` [B, H, L] (True = a step the
    head reads). Head h weighs the steps by the softmax of ``<k_t, q>`` over its mask when
    ``normalize[h]``, else by its mask (1 or 0: a masked sum). A softmax head with no step in its
    mask gets zero weights and a zero read."""
    if keys.dtype not in DTYPES:
        raise ValueError(f"dot attention takes float32 or bfloat16 keys, got {keys.dtype.name}")
    return _library().sim_merlin_dot_attention(
        tf.cast(query, keys.dtype), keys, tf.cast(masks, tf.bool),
        normalize=[bool(n) for n in normalize], threads=_threads())


def dot_attention(query, keys, mask):
    """(pooled [B, D], weights [B, L]): :func:`dot_reads` with one softmax head over ``mask``
    [B, L] (True = a real step). A row without a valid step gets zero weights and a zero pooled
    vector."""
    reads, weights = dot_reads(query, keys, tf.expand_dims(mask, 1), [True])
    return tf.squeeze(reads, 1), tf.squeeze(weights, 1)


@tf.RegisterGradient("SimMerlinDotAttention")
def _dot_attention_gradient(op, reads_grad, weights_grad):
    if reads_grad is None:
        reads_grad = tf.zeros_like(op.outputs[0])
    if weights_grad is None:
        weights_grad = tf.zeros_like(op.outputs[1])
    query_grad, keys_grad = _library().sim_merlin_dot_attention_grad(
        op.inputs[0], op.inputs[1], op.inputs[2], reads_grad, weights_grad,
        normalize=op.get_attr("normalize"), threads=op.get_attr("threads"))
    return [query_grad, keys_grad, None]
