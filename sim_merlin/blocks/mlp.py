"""The CTR towers: an MLP with PReLU activations that ends in one logit.

As in the reference: each hidden layer is Dense (Glorot-uniform kernel, zero bias) followed by
PReLU with one slope per unit initialised to 0.1; dropout, when ``dropout_rate > 0``, sits once
between the last hidden layer and the output; the output Dense(1) is float32 under mixed precision.

Example::

    >>> import sim_merlin.tf_compat  # noqa: F401
    >>> import tensorflow as tf
    >>> LogitMLP([200, 80])(tf.ones([3, 208])).shape.as_list()
    [3, 1]
"""
from __future__ import annotations

import sim_merlin.tf_compat  # noqa: F401
import merlin.models.tf as mm
import tensorflow as tf

from sim_merlin.blocks.prelu import PReLU


@tf.keras.utils.register_keras_serializable(package="sim_merlin")
class LogitMLP(mm.Block):
    """[batch, features] -> [batch, 1] logit through PReLU hidden layers ``units``."""

    def __init__(self, units=(200, 80), dropout_rate: float = 0.0, activation: str = "prelu",
                 **kwargs):
        super().__init__(**kwargs)
        self.units = tuple(int(u) for u in units)
        self.dropout_rate = float(dropout_rate)
        self.activation = activation
        self.hidden = []
        for index, width in enumerate(self.units):
            self.hidden.append(tf.keras.layers.Dense(width, name=f"dense_{index}"))
            if activation == "prelu":
                self.hidden.append(PReLU(
                    alpha_initializer=tf.keras.initializers.Constant(0.1), name=f"prelu_{index}"))
            else:
                self.hidden.append(tf.keras.layers.Activation(activation, name=f"act_{index}"))
        self.dropout = tf.keras.layers.Dropout(self.dropout_rate) if self.dropout_rate > 0 else None
        self.output_layer = tf.keras.layers.Dense(1, dtype="float32", name="logit")

    def call(self, inputs, training=False):
        x = inputs
        for layer in self.hidden:
            x = layer(x)
        if self.dropout is not None:
            x = self.dropout(x, training=training)
        return self.output_layer(x)

    def compute_output_shape(self, input_shape):
        return tf.TensorShape([input_shape[0], 1])

    def get_config(self):
        config = super().get_config()
        config.update(units=list(self.units), dropout_rate=self.dropout_rate,
                      activation=self.activation)
        return config
