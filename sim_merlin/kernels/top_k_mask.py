"""The k best positions of each row as a mask, as one op (``top_k_mask.cc``).

SIM's general search unit keeps the ``top_k`` behaviours of the long history by relevance, and
its exact search unit reads that choice as a mask over the history. :func:`top_k_mask` gives the
mask directly, selecting per row without a sort, instead of TensorFlow's sort of every row, a
histogram of the picked positions and a logical and; :func:`dot_top_k_mask` computes soft
search's keys (the target's inner product with each behaviour) in the same op. The blocks use
them where :func:`sim_merlin.kernels.model_ops.available` holds.

Example::

    >>> import sim_merlin.tf_compat  # noqa: F401
    >>> import tensorflow as tf
    >>> from sim_merlin.kernels import model_ops, top_k_mask
    >>> keys = tf.constant([[0.5, 3.0, 2.0, 9.0]])
    >>> valid = tf.constant([[True, True, True, False]])
    >>> if model_ops.available():
    ...     mask = top_k_mask.top_k_mask(keys, valid, 2)
    ...     assert mask.numpy().tolist() == [[False, True, True, False]]
"""
from __future__ import annotations

import sim_merlin.tf_compat  # noqa: F401
import tensorflow as tf

from sim_merlin.kernels.build import load as _library, threads as _threads


def top_k_mask(keys, valid, k: int):
    """[batch, length] bool: ``valid`` and among the ``k`` valid positions of the row with the
    highest ``keys`` (every valid position when a row has at most ``k``). Equal keys rank by
    position, lower first; NaN ranks last. ``keys`` [batch, length] (cast to float32), ``valid``
    of the same shape."""
    if int(k) < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    return _library().sim_merlin_top_k_mask(tf.cast(keys, tf.float32), tf.cast(valid, tf.bool),
                                            k=int(k), threads=_threads())


DTYPES = (tf.float32, tf.bfloat16)  # what dot_top_k_mask reads


def dot_top_k_mask(query, history, valid, k: int):
    """``top_k_mask(<history[b, t], query[b]>, valid, k)`` with the keys computed in the op: a
    float32 sum of the products rounded to ``history``'s dtype (float32 or bfloat16), as
    ``tf.matmul`` in that dtype rounds its output. ``query`` [batch, dim] (cast to
    ``history``'s dtype), ``history`` [batch, length, dim], ``valid`` [batch, length]."""
    if int(k) < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    history = tf.convert_to_tensor(history)
    if history.dtype not in DTYPES:
        raise ValueError(f"dot_top_k_mask reads float32 or bfloat16, got {history.dtype.name}")
    return _library().sim_merlin_dot_top_k_mask(
        tf.cast(query, history.dtype), history, tf.cast(valid, tf.bool), k=int(k),
        threads=_threads())


tf.no_gradient("SimMerlinTopKMask")
tf.no_gradient("SimMerlinDotTopKMask")
