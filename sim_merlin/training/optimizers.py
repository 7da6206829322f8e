"""The optimizers of ``python -m sim_merlin.fit``: ``adam``, ``lazy_adam`` and ``sgd``.

The reference takes AdamW, LazyAdam and SGDW from TensorFlow Addons (end of life, TF <= 2.15).
Here they are Keras optimizers with the same arithmetic:

- ``adam``: Adam in TensorFlow's epsilon-hat form (beta 0.9 / 0.999, epsilon 1e-7). An embedding
  gradient arrives sparse, but the moments of the *whole* table decay every step, exactly what the
  reference computes with its dense (``sparse_as_dense``) gradients.
- ``lazy_adam``: :class:`LazyAdam`, which updates only the rows a batch touched (moments and
  weights), like ``tfa.optimizers.LazyAdam``; dense variables get ordinary Adam. Much faster with
  large tables; not the same arithmetic as Adam.
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

OPTIMIZERS = ("adam", "lazy_adam", "sgd")


@tf.keras.utils.register_keras_serializable(package="sim_merlin")
class LazyAdam(tf.keras.optimizers.Adam):
    """Adam that, for sparse (embedding) gradients, updates only the rows present in the batch.

    Duplicate indices are summed first. Rows not in the batch keep their weights *and* moments;
    the bias correction uses the global step, as in ``tfa.optimizers.LazyAdam``.
    """

    def update_step(self, gradient, variable):
        if not isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable)
        dtype = variable.dtype
        lr = tf.cast(self.learning_rate, dtype)
        step = tf.cast(self.iterations + 1, dtype)
        beta_1 = tf.cast(self.beta_1, dtype)
        beta_2 = tf.cast(self.beta_2, dtype)
        alpha = lr * tf.sqrt(1 - tf.pow(beta_2, step)) / (1 - tf.pow(beta_1, step))
        key = self._var_key(variable)
        m = self._momentums[self._index_dict[key]]
        v = self._velocities[self._index_dict[key]]

        rows, position = tf.unique(gradient.indices)
        values = tf.math.unsorted_segment_sum(gradient.values, position, tf.shape(rows)[0])
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
        return tf.keras.optimizers.Adam(learning_rate, epsilon=1e-7, **decay)
    if name == "lazy_adam":
        return LazyAdam(learning_rate, epsilon=1e-7)
    return tf.keras.optimizers.SGD(learning_rate, momentum=0.0, **decay)
