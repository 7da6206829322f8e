"""Loss pieces shared by the models.

SIM optimises ``0.5 * (BCE(stage one) + BCE(stage two)) + auxiliary``; the stage-two term is the
model output's loss (:class:`ScaledBinaryCrossentropy` with ``scale=0.5``), the others are added by
the model block with ``add_loss``.

Example::

    >>> import sim_merlin.tf_compat  # noqa: F401
    >>> import tensorflow as tf
    >>> float(ScaledBinaryCrossentropy(0.5)(tf.constant([[1.0]]), tf.constant([[0.5]])))  # doctest: +ELLIPSIS
    0.3465...
"""
from __future__ import annotations

import sim_merlin.tf_compat  # noqa: F401
import tensorflow as tf


@tf.keras.utils.register_keras_serializable(package="sim_merlin")
class ScaledBinaryCrossentropy(tf.keras.losses.Loss):
    """``scale * binary cross-entropy`` of probabilities (the model output applies the sigmoid)."""

    def __init__(self, scale: float = 1.0, name: str = "scaled_binary_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.scale = float(scale)

    def call(self, y_true, y_pred):
        y_true = tf.cast(tf.reshape(y_true, tf.shape(y_pred)), y_pred.dtype)
        return self.scale * tf.keras.losses.binary_crossentropy(y_true, y_pred)

    def get_config(self):
        return {**super().get_config(), "scale": self.scale}


def labels_from(targets) -> tf.Tensor | None:
    """The binary label [batch] from Merlin's ``targets`` (a tensor or a one-entry dict)."""
    if targets is None:
        return None
    if isinstance(targets, dict):
        if len(targets) != 1:
            raise ValueError(f"expected one target (the label), got {sorted(targets)}")
        targets = next(iter(targets.values()))
    return tf.reshape(tf.cast(targets, tf.float32), [-1])


def logit_cross_entropy(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Mean binary cross-entropy of logits [batch, 1] against labels [batch]."""
    logits = tf.reshape(tf.cast(logits, tf.float32), [-1])
    return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits))
