"""The optimizers of ``python -m sim_merlin.fit``: ``adam``, ``lazy_adam`` and ``sgd``.

The reference takes AdamW, LazyAdam and SGDW from TensorFlow Addons (end of life, TF <= 2.15).
Here they are Keras optimizers with the same arithmetic:

- ``adam``: :class:`Adam`, Adam in TensorFlow's epsilon-hat form (beta 0.9 / 0.999, epsilon
  1e-7). An embedding gradient arrives sparse, but the moments of the *whole* table decay every
  step, exactly what the reference computes with its dense (``sparse_as_dense``) gradients. Each
  variable is updated by one fused kernel (``ResourceApplyAdam``: one pass over weights and
  moments); a sparse gradient is summed into a dense one by a single ``UnsortedSegmentSum``.
  Keras's Adam does the same arithmetic in about ten passes over the table plus a separate
  de-duplication of the sparse rows, 5x slower with the Books-size item table. Driven by a
  :class:`~sim_merlin.training.trainer.Trainer`, the tables whose reads are announced
  (:mod:`sim_merlin.blocks.table_reads`) skip even that pass: :meth:`Adam.defer_untouched_rows`
  makes a row's zero-gradient steps wait until it is read (:mod:`sim_merlin.kernels.adam`; the
  same bits as the dense update), and :meth:`Adam.synchronize` brings every row up to date.
- ``lazy_adam``: :class:`LazyAdam`, which updates only the rows a batch touched (moments and
  weights), like ``tfa.optimizers.LazyAdam``; dense variables get ordinary Adam. Much faster with
  large tables (one fused op, :mod:`sim_merlin.kernels.adam`); not the same arithmetic as Adam.
- ``sgd``: plain SGD, momentum 0.

``weight_decay`` is decoupled and, as in TensorFlow Addons, *not* multiplied by the learning rate:
every step ``var -= weight_decay * var`` for every variable (embeddings included). Like the
reference, ``lazy_adam`` ignores it.

Example::

    >>> import sim_merlin.tf_compat  # noqa: F401
    >>> import tensorflow as tf
    >>> table = tf.Variable([[1.0], [1.0], [1.0]])
    >>> optimizer = build_optimizer("lazy_adam", learning_rate=0.1)
    >>> optimizer.apply_gradients([(tf.IndexedSlices(tf.constant([[1.0]]), tf.constant([1])),
    ...                             table)])  # doctest: +ELLIPSIS
    <tf.Variable ...>
    >>> [round(float(x), 4) for x in table.numpy().ravel()]
    [1.0, 0.9, 1.0]
"""
from __future__ import annotations

import math

import sim_merlin.tf_compat  # noqa: F401
import tensorflow as tf

from sim_merlin.kernels import adam as fused_adam

OPTIMIZERS = ("adam", "lazy_adam", "sgd")


class _MergesOwnDuplicates:
    """Keras sums the duplicate rows of every sparse gradient (``tf.unique`` +
    ``unsorted_segment_sum``) before ``update_step``; our update steps sum them themselves, in the
    one pass they need anyway."""

    def _deduplicate_sparse_grad(self, grads):
        return grads


def _unwrapped(variable):
    """The resource variable under a Keras mixed-precision ``AutoCastVariable``."""
    return getattr(variable, "_variable", variable)


def _adam_slots(optimizer, variable):
    """``(variable, m, v)`` of a Keras Adam: the variable unwrapped, its two moment slots."""
    key = optimizer._var_key(variable)
    return (_unwrapped(variable), optimizer._momentums[optimizer._index_dict[key]],
            optimizer._velocities[optimizer._index_dict[key]])


def _fused_lazy_update(optimizer, gradient, variable) -> bool:
    """LazyAdam's update of a float32 matrix from a sparse gradient as one op
    (:mod:`sim_merlin.kernels.adam`) when it is available; False when it is not."""
    if not (variable.dtype == tf.float32 and variable.shape.rank == 2
            and fused_adam.available()):
        return False
    fused_adam.lazy_update(
        *_adam_slots(optimizer, variable), gradient,
        learning_rate=optimizer.learning_rate, beta_1=optimizer.beta_1,
        beta_2=optimizer.beta_2, epsilon=optimizer.epsilon,
        step=tf.cast(optimizer.iterations + 1, tf.float32),
    )
    return True


class _DeferredRows:
    """The tables whose untouched rows wait: per table (by variable key) its int32 per-row step
    counts. A plain object, so the optimizer does not track the counts: they are not
    checkpointed (:meth:`Adam.synchronize` before saving; :meth:`Adam.mark_current` after
    restoring)."""

    def __init__(self):
        self.steps = {}
        self.tables = {}
        self.learning_rate = None


@tf.keras.utils.register_keras_serializable(package="sim_merlin")
class Adam(_MergesOwnDuplicates, tf.keras.optimizers.Adam):
    """Keras Adam (same slots, same arithmetic) with one fused kernel per variable.

    ``m += (1 - beta_1) (g - m)``, ``v += (1 - beta_2) (g^2 - v)``,
    ``var -= lr sqrt(1 - beta_2^t) / (1 - beta_1^t) * m / (sqrt(v) + epsilon)`` for every row,
    with ``g`` = 0 on the rows a sparse gradient does not touch.

    After :meth:`defer_untouched_rows`, those zero-gradient steps of an announced table wait
    until its rows are read: whoever applies the updates must call :meth:`catch_up` before every
    read (a :class:`~sim_merlin.training.trainer.Trainer` does, through
    :func:`sim_merlin.blocks.table_reads.listening`), :meth:`mark_current` before the first
    update and :meth:`synchronize` before reading or saving whole tables.
    """

    def defer_untouched_rows(self, variables) -> list:
        """Defer the zero-gradient steps of the ``variables`` that are float32 tables whose reads
        are announced, where the fused kernels are available, the learning rate is a constant and
        there is no weight decay; returns the deferred variables."""
        from sim_merlin.blocks.table_reads import reads_announced

        if (not fused_adam.available() or self.weight_decay
                or isinstance(self._learning_rate,
                              tf.keras.optimizers.schedules.LearningRateSchedule)):
            return []
        if not hasattr(self, "_deferred"):
            self._deferred = _DeferredRows()
        chosen = []
        for variable in variables:
            if not (variable.dtype == tf.float32 and variable.shape.rank == 2
                    and variable.shape[0] is not None and reads_announced(variable)):
                continue
            key = self._var_key(variable)
            if key not in self._deferred.steps:
                with tf.init_scope():
                    self._deferred.steps[key] = tf.Variable(
                        tf.zeros([variable.shape[0]], tf.int32), trainable=False,
                        name=f"{variable.name.split(':')[0]}/adam_steps")
                self._deferred.tables[key] = variable
            chosen.append(variable)
        if chosen and self._deferred.learning_rate is None:
            with tf.init_scope():
                self._deferred.learning_rate = tf.Variable(
                    tf.cast(self.learning_rate, tf.float32), trainable=False,
                    name="deferred_learning_rate")
        return chosen

    def _steps(self, variable):
        deferred = getattr(self, "_deferred", None)
        return None if deferred is None else deferred.steps.get(self._var_key(variable))

    def catch_up(self, variable, ids) -> None:
        """Bring the rows ``ids`` of ``variable`` up to the current step (no-op for a variable
        that is not deferred)."""
        steps = self._steps(variable)
        if steps is not None:  # the rate of the pending steps (a change is refused: update_step)
            fused_adam.catch_up(*_adam_slots(self, variable), steps, ids,
                                self._deferred.learning_rate, self.beta_1, self.beta_2,
                                self.epsilon, self.iterations)

    def mark_current(self) -> None:
        """Declare every row of the deferred tables up to date (after :meth:`synchronize`, or
        when the tables and moments were set from outside, e.g. restored from a checkpoint)."""
        deferred = getattr(self, "_deferred", None)
        if deferred is None:
            return
        for steps in deferred.steps.values():
            steps.assign(tf.fill(tf.shape(steps), tf.cast(self.iterations, tf.int32)))
        if deferred.learning_rate is not None:
            deferred.learning_rate.assign(tf.cast(self.learning_rate, tf.float32))

    def synchronize(self) -> None:
        """Bring every row of the deferred tables up to the current step: afterwards the tables
        and moments are those of dense Adam."""
        deferred = getattr(self, "_deferred", None)
        if deferred is None:
            return
        for key, variable in deferred.tables.items():
            steps = deferred.steps[key]
            fused_adam.catch_up(*_adam_slots(self, variable), steps,
                                tf.range(tf.shape(steps)[0]), deferred.learning_rate,
                                self.beta_1, self.beta_2, self.epsilon, self.iterations)

    def _deferred_update(self, gradient, variable, steps) -> None:
        learning_rate = tf.cast(self.learning_rate, tf.float32)
        tf.debugging.assert_equal(
            learning_rate, self._deferred.learning_rate,
            message="the learning rate changed while some embedding rows had Adam steps "
                    "pending; call synchronize() (Trainer.synchronize()) before changing it")
        if not isinstance(gradient, tf.IndexedSlices):  # e.g. sparse_as_dense: every row
            gradient = tf.IndexedSlices(gradient, tf.range(tf.shape(gradient)[0]))
        fused_adam.deferred_update(*_adam_slots(self, variable), steps, gradient,
                                   learning_rate, self.beta_1, self.beta_2, self.epsilon,
                                   self.iterations + 1)

    def update_step(self, gradient, variable):
        steps = self._steps(variable)
        if steps is not None:
            return self._deferred_update(gradient, variable, steps)
        dtype = variable.dtype
        if isinstance(gradient, tf.IndexedSlices):
            if gradient.values.dtype != dtype:  # e.g. bfloat16 rows: summed in float32
                gradient = tf.IndexedSlices(tf.cast(gradient.values, dtype), gradient.indices,
                                            gradient.dense_shape)
            indices = gradient.indices
            rows = variable.shape[0]
            if rows is not None and rows < 2**31:
                indices = tf.cast(indices, tf.int32)
            gradient = tf.math.unsorted_segment_sum(gradient.values, indices,
                                                    tf.shape(variable, out_type=indices.dtype)[0])
        step = tf.cast(self.iterations + 1, dtype)
        table, m, v = _adam_slots(self, variable)
        tf.raw_ops.ResourceApplyAdam(
            var=table.handle, m=_unwrapped(m).handle, v=_unwrapped(v).handle,
            beta1_power=tf.pow(tf.cast(self.beta_1, dtype), step),
            beta2_power=tf.pow(tf.cast(self.beta_2, dtype), step),
            lr=tf.cast(self.learning_rate, dtype), beta1=tf.cast(self.beta_1, dtype),
            beta2=tf.cast(self.beta_2, dtype), epsilon=tf.cast(self.epsilon, dtype),
            grad=tf.cast(gradient, dtype), use_locking=False,
        )


@tf.keras.utils.register_keras_serializable(package="sim_merlin")
class SGD(_MergesOwnDuplicates, tf.keras.optimizers.SGD):
    """Keras SGD; a sparse gradient's duplicate rows are summed by the scatter-add itself."""


@tf.keras.utils.register_keras_serializable(package="sim_merlin")
class LazyAdam(_MergesOwnDuplicates, tf.keras.optimizers.Adam):
    """Adam that, for sparse (embedding) gradients, updates only the rows present in the batch.

    Duplicate indices are summed first. Rows not in the batch keep their weights *and* moments;
    the bias correction uses the global step, as in ``tfa.optimizers.LazyAdam``.
    """

    def update_step(self, gradient, variable):
        if not isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable)
        if _fused_lazy_update(self, gradient, variable):
            return
        dtype = variable.dtype
        lr = tf.cast(self.learning_rate, dtype)
        step = tf.cast(self.iterations + 1, dtype)
        beta_1 = tf.cast(self.beta_1, dtype)
        beta_2 = tf.cast(self.beta_2, dtype)
        alpha = lr * tf.sqrt(1 - tf.pow(beta_2, step)) / (1 - tf.pow(beta_1, step))
        _, m, v = _adam_slots(self, variable)

        indices = gradient.indices
        if variable.shape[0] is not None and variable.shape[0] < 2**31:
            indices = tf.cast(indices, tf.int32)  # tf.unique is several times faster on int32
        rows, position = tf.unique(indices)
        values = tf.scatter_nd(tf.expand_dims(position, 1), gradient.values,
                               tf.concat([tf.shape(rows), tf.shape(gradient.values)[1:]], 0))
        m_rows = beta_1 * tf.gather(m, rows) + (1 - beta_1) * values
        v_rows = beta_2 * tf.gather(v, rows) + (1 - beta_2) * tf.square(values)
        m.scatter_update(tf.IndexedSlices(m_rows, rows))
        v.scatter_update(tf.IndexedSlices(v_rows, rows))
        variable.scatter_sub(tf.IndexedSlices(alpha * m_rows / (tf.sqrt(v_rows) + self.epsilon),
                                              rows))


def build_optimizer(name: str, learning_rate: float = 0.01, weight_decay: float = 0.0):
    """A Keras optimizer for ``name`` in :data:`OPTIMIZERS` (see the module docstring)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    if not 0 < learning_rate < math.inf:  # also rejects NaN
        raise ValueError(f"--lr must be a positive number, got {learning_rate}")
    if not 0 <= weight_decay < math.inf:
        raise ValueError(f"--weight_decay must be a number >= 0, got {weight_decay}")
    # Keras decays by ``weight_decay * lr``; Addons (the reference) by ``weight_decay``.
    decay = {"weight_decay": weight_decay / learning_rate} if weight_decay > 0 else {}
    if name == "adam":
        return Adam(learning_rate, epsilon=1e-7, **decay)
    if name == "lazy_adam":
        return LazyAdam(learning_rate, epsilon=1e-7)
    return SGD(learning_rate, momentum=0.0, **decay)
