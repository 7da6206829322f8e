"""Lookups of several embedding tables written side by side in the model's dtype, as one op.

A behaviour sequence embeds each step with a row of every item-feature table and concatenates
them. In TensorFlow ops that is a float32 gather per table, a cast to the compute dtype per table
(``mixed_bfloat16``) and a concat: three passes and two float32 copies of the result.
:func:`embedding_rows` writes each output row once (``embedding_rows.cc``), with the same values
to the bit (the cast rounds as TensorFlow's). Its gradient is one ``tf.IndexedSlices`` per table,
as a gather's, so sparse-aware optimizers see what they saw before; their float32 values come
from one op too (a split and a cast per table in TensorFlow ops).

Example::

    >>> import sim_merlin.tf_compat  # noqa: F401
    >>> import tensorflow as tf
    >>> from sim_merlin.kernels import embedding_rows, model_ops
    >>> items = tf.Variable([[1.0, 2.0], [3.0, 4.0]])
    >>> categories = tf.Variable([[5.0], [6.0], [7.0]])
    >>> if model_ops.available():
    ...     rows = embedding_rows.embedding_rows([items, categories],
    ...                                          [tf.constant([1, 0]), tf.constant([2, 2])])
    ...     assert rows.numpy().tolist() == [[3.0, 4.0, 7.0], [1.0, 2.0, 7.0]]
"""
from __future__ import annotations

import sim_merlin.tf_compat  # noqa: F401
import tensorflow as tf
from tensorflow.python.eager import tape as _tape
from tensorflow.python.ops import resource_variable_ops

from sim_merlin.kernels.build import load as _library, threads as _threads


def _variable(table):
    return getattr(table, "_variable", table)  # under an AutoCastVariable, the float32 one


def embedding_rows(tables, ids, dtype=tf.float32):
    """``concat([cast(gather(table, i), dtype) for table, i in zip(tables, ids)], -1)``.

    ``tables``: float32 matrix variables [rows_k, width_k]; ``ids``: integer tensors of one shape
    S (one per table); ``dtype``: float32 or bfloat16. Returns S + [sum of widths]. An id outside
    its table raises ``InvalidArgumentError`` naming it.
    """
    tables = [_variable(t) for t in tables]
    if len(tables) != len(ids) or not tables:
        raise ValueError(f"embedding_rows needs one ids tensor per table, got {len(tables)} "
                         f"tables and {len(ids)} ids")
    widths = []
    for table in tables:
        if table.dtype != tf.float32 or table.shape.rank != 2 or table.shape[1] is None:
            raise ValueError(f"embedding_rows reads float32 matrices of known width, got "
                             f"{table.name} {table.dtype.name} {table.shape}")
        widths.append(int(table.shape[1]))
        _tape.variable_accessed(table)  # the tape then sees the read, as a gather's
    index_dtype = tf.int32 if all(i.dtype == tf.int32 for i in ids) else tf.int64
    return _library().sim_merlin_embedding_rows(
        [t.handle for t in tables], [tf.cast(i, index_dtype) for i in ids], widths=widths,
        T=tf.as_dtype(dtype), threads=_threads())


@tf.RegisterGradient("SimMerlinEmbeddingRows")
def _embedding_rows_gradient(op, rows_grad):
    count = op.get_attr("N")
    values = _library().sim_merlin_embedding_rows_grad(
        rows_grad, N=count, widths=op.get_attr("widths"), threads=op.get_attr("threads"))
    gradients = [tf.IndexedSlices(part, tf.reshape(ids, [-1]),
                                  resource_variable_ops.variable_shape(handle))
                 for handle, ids, part in zip(op.inputs[:count], op.inputs[count:], values)]
    return gradients + [None] * count
