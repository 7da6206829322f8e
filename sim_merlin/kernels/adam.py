"""Adam updates of an embedding table from its sparse gradient, as fused ops.

**LazyAdam.** 
In TensorFlow ops, LazyAdam's sparse update is a unique over the batch's rows, a scatter that sums
the repeated ones, two gathers of the moments and three scatter updates (weights, moments).
:func:`lazy_update` does it in one op: the repeated rows are summed into a compact buffer in the
order they come (deterministic), then only those rows of the table and its moments are updated,
in place. :func:`available` says whether the op can be used here (CPU variables, library built).

**Dense Adam, deferred** (``deferred_adam.cc``). Dense Adam moves every row of a table every
step, the rows a batch did not touch too (their gradient is 0 but their moments are not): one pass
over the whole table and its moments per step, bound by memory bandwidth. Those zero-gradient
steps depend on nothing but the row, so they can wait until the row is read: ``steps`` (int32,
one per row) counts the steps each row has had; :func:`catch_up` brings rows to a step count (call
it before reading them), :func:`deferred_update` applies step ``t`` to a batch's rows. The values
are the same bits as ``ResourceApplyAdam``'s (same float operations, same order); reading the
whole table needs :func:`catch_up` over all its rows first.

Example::

    >>> import sim_merlin.tf_compat  # noqa: F401
    >>> import tensorflow as tf
    >>> from sim_merlin.kernels import adam
    >>> table, m, v = (tf.Variable(tf.zeros([4, 2])) for _ in range(3))
    >>> if adam.available():
    ...     steps = tf.Variable(tf.zeros([4], tf.int32))
    ...     adam.deferred_update(table, m, v, steps, tf.IndexedSlices(tf.ones([1, 2]),
    ...                          tf.constant([2])), 0.1, 0.9, 0.999, 1e-7, step=1)
    ...     adam.catch_up(table, m, v, steps, tf.range(4), 0.1, 0.9, 0.999, 1e-7, step=1)
    ...     assert list(steps.numpy()) == [1, 1, 1, 1] and float(table[2, 0]) < 0.0
    ...     adam.lazy_update(table, m, v,
    ...                      tf.IndexedSlices(tf.ones([3, 2]), tf.constant([1, 1, 3])),
    ...                      learning_rate=0.1, beta_1=0.9, beta_2=0.999, epsilon=1e-7, step=1.0)
    ...     assert float(table[0, 0]) == 0.0 and float(table[1, 0]) < 0.0
"""
from __future__ import annotations

import sim_merlin.tf_compat  # noqa: F401
import tensorflow as tf

from sim_merlin.kernels import build
from sim_merlin.kernels.build import load as _library, threads as _threads


def available() -> bool:
    """The op can be used here (the library loads; CPU variables)."""
    return build.usable()


def _scalar(x):
    return tf.cast(x, tf.float32)


tf.no_gradient("SimMerlinAdamCatchUp")
tf.no_gradient("SimMerlinDeferredAdam")


def catch_up(variable, m, v, steps, rows, learning_rate, beta_1, beta_2, epsilon, step):
    """Bring ``rows`` (a tensor of any shape, or a list of them; repeats allowed) of the float32
    matrix ``variable`` (slots ``m``, ``v``; ``steps`` its int32 per-row step counts) to ``step``
    Adam steps: the zero-gradient steps they missed, as dense Adam would have made them."""
    rows = list(rows) if isinstance(rows, (list, tuple)) else [rows]
    dtype = tf.int32 if all(r.dtype == tf.int32 for r in rows) else tf.int64
    return _library().sim_merlin_adam_catch_up(
        variable.handle, m.handle, v.handle, steps.handle, [tf.cast(r, dtype) for r in rows],
        _scalar(learning_rate), _scalar(beta_1), _scalar(beta_2), _scalar(epsilon),
        tf.cast(step, tf.int64), threads=_threads())


def deferred_update(variable, m, v, steps, gradient: tf.IndexedSlices, learning_rate, beta_1,
                    beta_2, epsilon, step):
    """Dense Adam's step ``step`` (from 1) of the rows in ``gradient`` (repeats summed in
    float32, also from bfloat16 rows), each first brought to ``step - 1`` steps; the other rows
    wait (see :func:`catch_up`)."""
    indices = gradient.indices
    if indices.dtype not in (tf.int32, tf.int64):
        indices = tf.cast(indices, tf.int64)
    values = gradient.values  # bfloat16 rows are widened by the op (exactly)
    if values.dtype != tf.bfloat16:
        values = tf.cast(values, tf.float32)
    return _library().sim_merlin_deferred_adam(
        variable.handle, m.handle, v.handle, steps.handle, indices, values, _scalar(learning_rate), _scalar(beta_1),
        _scalar(beta_2), _scalar(epsilon), tf.cast(step, tf.int64), threads=_threads())


def lazy_update(variable, m, v, gradient: tf.IndexedSlices, learning_rate, beta_1, beta_2,
                epsilon, step):
    """One LazyAdam step of the float32 matrix ``variable`` (slots ``m``, ``v``) from a sparse
    gradient; ``step`` counts from 1 (the bias correction uses the global step)."""
    indices = gradient.indices
    if indices.dtype not in (tf.int32, tf.int64):
        indices = tf.cast(indices, tf.int64)
    scalar = lambda x: tf.cast(x, tf.float32)  # noqa: E731
    return _library().sim_merlin_lazy_adam(
        variable.handle, m.handle, v.handle, indices, tf.cast(gradient.values, tf.float32),
        scalar(learning_rate), scalar(beta_1), scalar(beta_2), scalar(epsilon), scalar(step),
        threads=_threads())
