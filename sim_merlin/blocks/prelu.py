"""PReLU, the CTR towers' activation, with its fused op where the kernels are available.

A drop-in :class:`tf.keras.layers.PReLU` (same weights, names, config and values): when the
fused kernels can go into the graph (:func:`sim_merlin.kernels.model_ops.available`) and the
slopes are one per unit of the inputs' trailing dimensions (Keras's default, no shared axes), the
layer runs :func:`sim_merlin.kernels.prelu.prelu`, one pass over the activations each way
instead of Keras's six ops; otherwise Keras's own ops, which give the same values.

Example::

    >>> import sim_merlin.tf_compat  # noqa: F401
    >>> import tensorflow as tf
    >>> layer = PReLU(alpha_initializer=tf.keras.initializers.Constant(0.25))
    >>> layer(tf.constant([[4.0, -4.0]])).numpy().tolist()
    [[4.0, -1.0]]
"""
from __future__ import annotations

import sim_merlin.tf_compat  # noqa: F401
import tensorflow as tf

from sim_merlin.kernels import model_ops, prelu as fused_prelu


@tf.keras.utils.register_keras_serializable(package="sim_merlin")
class PReLU(tf.keras.layers.PReLU):
    """:class:`tf.keras.layers.PReLU` computed by one fused op each way where available."""

    def call(self, inputs):
        if (model_ops.available() and inputs.dtype in fused_prelu.DTYPES
                and inputs.shape[-self.alpha.shape.rank:] == self.alpha.shape):
            return fused_prelu.prelu(inputs, self.alpha)  # cast to the compute dtype there
        return super().call(inputs)
