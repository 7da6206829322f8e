"""LazyAdam's update of an embedding table from its sparse gradient, as one fused op.

In TensorFlow ops, LazyAdam's sparse update is a unique over the batch's rows, a scatter that sums
the repeated ones, two gathers of the moments and three scatter updates (weights, moments).
:func:`lazy_update` does it in one op: the repeated rows are summed into a compact buffer in the
order they come (deterministic), then only those rows of the table and its moments are updated,
in place. :func:`available` says whether the op can be used here (CPU variables, library built).

(Dense Adam gains nothing from the same fusion here: its passes over the whole table are bound
by memory bandwidth, and ``ResourceApplyAdam`` already makes one.)

Example::

    >>> import sim_merlin.tf_compat  # noqa: F401
    >>> import tensorflow as tf
    >>> from sim_merlin.kernels import adam
    >>> table, m, v = (tf.Variable(tf.zeros([4, 2])) for _ in range(3))
    >>> if adam.available():
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
