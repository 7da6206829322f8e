"""Lookups of several embedding tables written side by side in the model's dtype, as one op.

A behaviour sequence embeds each step with a row of every item-feature table and concatenates
them. In TensorFlow ops that is a float32 gather per table, a cast to the compute dtype per table
(``mixed_bfloat16``) and a concat: three passes and two float32 copies of the result.
:func:`embedding_rows` writes each output row once (``embedding_rows.cc``), with the same values
to the bit (the cast rounds as TensorFlow's). Its gradient is one ``tf.IndexedSlices`` per table,
as a gather's, so sparse-aware optimizers see what they saw before; their float32 values come
from one op too (a split and a cast per table in TensorFlow ops). A small table read many times
in one lookup (at least 16 ids per row, at most 32,768 rows: the categories of a long history)
gets its gradient rows already summed per table row, so the optimizer sums and updates one row
per table row rather than one per id. With ``mask``, the positions where it is false get rows of
zeros and zero gradient rows: a history's padded steps, without a product by the mask and its
gradient (two passes over the result).

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

import contextlib
import threading
import weakref

import sim_merlin.tf_compat  # noqa: F401
import tensorflow as tf
from tensorflow.python.eager import tape as _tape
from tensorflow.python.ops import resource_variable_ops

from sim_merlin.kernels.build import load as _library, threads as _threads


MAX_SUMMED_ROWS = 32768  # embedding_rows.cc's kMaxSummedRows

_state = threading.local()
# graph -> {name of a grouped lookup op: per table, whether its gradient rows stay bfloat16}
_BFLOAT16_GRADIENTS = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def bfloat16_gradient_rows(variables):
    """Within the block, a bfloat16 :func:`embedding_row_groups` traced in a ``tf.function``
    gives the gradient rows of those of ``variables`` larger than ``MAX_SUMMED_ROWS`` rows in
    bfloat16, the dtype the gradient arrives in, instead of float32: the same values (bfloat16
    widens to float32 exactly), half the bytes to write and to read back. Only for tables whose
    gradient goes to an update that takes bfloat16 rows (Adam's deferred update,
    :func:`sim_merlin.kernels.adam.deferred_update`), not to one that would sum them in
    bfloat16."""
    previous = getattr(_state, "bfloat16", ())
    _state.bfloat16 = previous + tuple(_variable(v) for v in variables)
    try:
        yield
    finally:
        _state.bfloat16 = previous


def _bfloat16_gradient_tables(tables, rows, dtype) -> list:
    wanted = getattr(_state, "bfloat16", ())
    if tf.as_dtype(dtype) != tf.bfloat16 or not wanted or not tf.inside_function():
        return []
    return [any(t is w for w in wanted) and r > MAX_SUMMED_ROWS for t, r in zip(tables, rows)]


def _variable(table):
    return getattr(table, "_variable", table)  # under an AutoCastVariable, the float32 one


def _tables_and_widths(tables):
    """The float32 variables under ``tables`` and their widths; each read recorded on the tape."""
    tables = [_variable(t) for t in tables]
    widths = []
    for table in tables:
        if table.dtype != tf.float32 or table.shape.rank != 2 or table.shape[1] is None:
            raise ValueError(f"embedding_rows reads float32 matrices of known width, got "
                             f"{table.name} {table.dtype.name} {table.shape}")
        widths.append(int(table.shape[1]))
        _tape.variable_accessed(table)  # the tape then sees the read, as a gather's
    rows = [int(t.shape[0]) if t.shape[0] is not None else 0 for t in tables]
    return tables, widths, rows


def _index_dtype(ids):
    return tf.int32 if all(i.dtype == tf.int32 for i in ids) else tf.int64


def embedding_rows(tables, ids, dtype=tf.float32, mask=None):
    """``concat([cast(gather(table, i), dtype) for table, i in zip(tables, ids)], -1)``, times
    ``mask[..., None]`` when a mask is given.

    ``tables``: float32 matrix variables [rows_k, width_k]; ``ids``: integer tensors of one shape
    S (one per table); ``dtype``: float32 or bfloat16; ``mask``: None or a bool (or 0/1) tensor
    of shape S. Returns S + [sum of widths]. An id outside its table raises
    ``InvalidArgumentError`` naming it (masked positions' ids too).
    """
    if len(tables) != len(ids) or not tables:
        raise ValueError(f"embedding_rows needs one ids tensor per table, got {len(tables)} "
                         f"tables and {len(ids)} ids")
    tables, widths, rows = _tables_and_widths(tables)
    index_dtype = _index_dtype(ids)
    masks = [] if mask is None else [tf.cast(mask, tf.bool)]
    return _library().sim_merlin_embedding_rows(
        [t.handle for t in tables], [tf.cast(i, index_dtype) for i in ids], masks,
        widths=widths, table_rows=rows, T=tf.as_dtype(dtype), threads=_threads())


def embedding_row_groups(tables, ids, dtype=tf.float32, masks=None):
    """Several :func:`embedding_rows` of the same ``tables`` as one op: ``[embedding_rows(tables,
    ids[g], dtype, masks[g]) for g in groups]``, the same values.

    ``ids``: one list per group of one ids tensor per table (each group its own shape);
    ``masks``: None, or one mask or None per group. The gradient is one ``tf.IndexedSlices`` per
    table for all groups together (the groups' rows in group order), where separate lookups give
    one per lookup, which the gradient tape concatenates (a copy of every row) before the update.

    Example (a target id per row and a history of two ids per row, one table)::

        >>> from sim_merlin.kernels import model_ops
        >>> table = tf.Variable([[1.0], [2.0], [3.0]])
        >>> if model_ops.available():
        ...     target, history = embedding_row_groups(
        ...         [table], [[tf.constant([2, 0])], [tf.constant([[1, 2], [0, 1]])]])
        ...     assert target.numpy().tolist() == [[3.0], [1.0]]
        ...     assert history.numpy().tolist() == [[[2.0], [3.0]], [[1.0], [2.0]]]
    """
    masks = [None] * len(ids) if masks is None else list(masks)
    if not ids or len(masks) != len(ids) or any(len(g) != len(tables) for g in ids):
        raise ValueError(f"embedding_row_groups needs, per group, one ids tensor per table "
                         f"({len(tables)}) and one mask or None; got {[len(g) for g in ids]} "
                         f"ids and {len(masks)} masks")
    tables, widths, rows = _tables_and_widths(tables)
    index_dtype = _index_dtype([i for group in ids for i in group])
    outputs = _library().sim_merlin_embedding_row_groups(
        [t.handle for t in tables], [tf.cast(i, index_dtype) for group in ids for i in group],
        [tf.cast(m, tf.bool) for m in masks if m is not None],
        G=len(ids), masked=[m is not None for m in masks], widths=widths, table_rows=rows,
        T=tf.as_dtype(dtype), threads=_threads())
    half = _bfloat16_gradient_tables(tables, rows, dtype)
    if any(half):
        op = outputs[0].op
        _BFLOAT16_GRADIENTS.setdefault(op.graph, {})[op.name] = half
    return outputs


@tf.RegisterGradient("SimMerlinEmbeddingRows")
def _embedding_rows_gradient(op, rows_grad):
    count = op.get_attr("N")
    rows = op.get_attr("table_rows") or [0] * count
    ids = op.inputs[count:2 * count]
    masks = op.inputs[2 * count:]
    values, indices = _library().sim_merlin_embedding_rows_grad(
        rows_grad, ids, masks, widths=op.get_attr("widths"), table_rows=rows,
        threads=op.get_attr("threads"))
    # A small table read many times gets its rows summed per table row (embedding_rows.cc);
    # the op then gives the indices. A larger one: one row per id.
    gradients = [tf.IndexedSlices(part, index if 0 < table_rows <= MAX_SUMMED_ROWS
                                  else tf.reshape(table_ids, [-1]),
                                  resource_variable_ops.variable_shape(handle))
                 for handle, table_ids, part, index, table_rows
                 in zip(op.inputs[:count], ids, values, indices, rows)]
    return gradients + [None] * (len(op.inputs) - count)


@tf.RegisterGradient("SimMerlinEmbeddingRowGroups")
def _embedding_row_groups_gradient(op, *rows_grads):
    count, groups = op.get_attr("N"), op.get_attr("G")
    ids = op.inputs[count:count + count * groups]
    masks = op.inputs[count + count * groups:]
    rows_grads = [tf.zeros_like(output) if grad is None else grad
                  for grad, output in zip(rows_grads, op.outputs)]
    forward = getattr(op.outputs[0], "op", None)  # the tape passes a stand-in for the op
    half = (_BFLOAT16_GRADIENTS.get(forward.graph, {}).get(forward.name) if forward is not None
            else None) or [False] * count
    values, indices = _library().sim_merlin_embedding_row_groups_grad(
        rows_grads, ids, masks, N=count, masked=op.get_attr("masked"), widths=op.get_attr("widths"),
        table_rows=op.get_attr("table_rows"), threads=op.get_attr("threads"),
        Tvalues=[tf.bfloat16 if h else tf.float32 for h in half])
    gradients = [tf.IndexedSlices(part, index, resource_variable_ops.variable_shape(handle))
                 for handle, part, index in zip(op.inputs[:count], values, indices)]
    return gradients + [None] * (len(op.inputs) - count)
