"""Dot-product softmax attention over a masked sequence, forward and gradient as one op each.

The attention the reference uses in DIN and in SIM's exact search unit: scores ``<k_t, q>``, a
softmax over the valid steps, the weighted sum of the keys. In TensorFlow ops each step of it is
a pass over the [batch, length, dim] keys, and the keys' gradient is the sum of two of them;
``dot_attention.cc`` does each sample in one pass, in float32 (bfloat16 inputs widened,
outputs rounded to nearest even). Padded steps get weight exactly 0 and a zero gradient, so the
keys need not be zeroed there.

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


def dot_attention(query, keys, mask):
    """(pooled [B, D], weights [B, L]) for ``query`` [B, D], ``keys`` [B, L, D] (float32 or
    bfloat16; the query is cast to the keys' dtype) and ``mask`` [B, L] (True = a real step).
    A row without a valid step gets zero weights and a zero pooled vector."""
    if keys.dtype not in DTYPES:
        raise ValueError(f"dot_attention takes float32 or bfloat16 keys, got {keys.dtype.name}")
    return _library().sim_merlin_dot_attention(tf.cast(query, keys.dtype), keys,
                                               tf.cast(mask, tf.bool), threads=_threads())


@tf.RegisterGradient("SimMerlinDotAttention")
def _dot_attention_gradient(op, pooled_grad, weights_grad):
    if pooled_grad is None:
        pooled_grad = tf.zeros_like(op.outputs[0])
    if weights_grad is None:
        weights_grad = tf.zeros_like(op.outputs[1])
    query_grad, keys_grad = _library().sim_merlin_dot_attention_grad(
        op.inputs[0], op.inputs[1], op.inputs[2], pooled_grad, weights_grad,
        threads=op.get_attr("threads"))
    return [query_grad, keys_grad, None]
