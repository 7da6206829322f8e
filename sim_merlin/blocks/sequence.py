"""Behaviour sequences as dense, left-padded tensors with masks (newest behaviour last).

The preprocessed data stores histories left-padded with 0 and newest last; blocks also accept
ragged tensors (each row oldest -> newest, no padding), which are laid out the same way here.

Example::

    >>> import sim_merlin.tf_compat  # noqa: F401
    >>> import tensorflow as tf
    >>> values, mask = dense_sequence(tf.ragged.constant([[1, 2, 3], [4]]))
    >>> values.numpy().tolist(), mask.numpy().tolist()
    ([[1, 2, 3], [0, 0, 4]], [[True, True, True], [False, False, True]])
"""
from __future__ import annotations

import sim_merlin.tf_compat  # noqa: F401
import tensorflow as tf


def left_pad(ragged: tf.RaggedTensor, length=None) -> tuple[tf.Tensor, tf.Tensor]:
    """Ragged [batch, (steps), ...] -> (dense [batch, length, ...] right-aligned, mask)."""
    reversed_rows = tf.reverse(ragged, axis=[1])
    if length is None:
        dense = reversed_rows.to_tensor()
    else:
        shape = [None, length] + ragged.values.shape[1:].as_list()
        dense = reversed_rows[:, :length].to_tensor(shape=shape)
    lengths = tf.minimum(ragged.row_lengths(), tf.cast(tf.shape(dense)[1], tf.int64))
    mask = tf.sequence_mask(lengths, maxlen=tf.shape(dense)[1])
    return tf.reverse(dense, axis=[1]), tf.reverse(mask, axis=[1])


def dense_sequence(values, mask=None) -> tuple[tf.Tensor, tf.Tensor]:
    """(dense values, boolean mask) from dense values + mask, or from ragged values."""
    if isinstance(values, tf.RaggedTensor):
        return left_pad(values)
    if mask is None:
        raise ValueError("a dense behaviour sequence needs its mask (non-zero = real behaviour)")
    return values, tf.cast(mask, tf.bool)
