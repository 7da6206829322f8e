"""PReLU forward and gradient as one op each (``prelu.cc``).

The CTR towers' PReLU is, in Keras, ``relu(x) - alpha * relu(-x)``: six TensorFlow ops forward
and as many backward, each a pass over the activations. :func:`prelu` computes the same values
(bit for bit, in float32 and in bfloat16) in one pass each way; the slope gradient is summed in
float32 and rounded once, as TensorFlow's sum does. :class:`sim_merlin.blocks.prelu.PReLU` uses
it where :func:`sim_merlin.kernels.model_ops.available` holds.

Example::

    >>> import sim_merlin.tf_compat  # noqa: F401
    >>> import tensorflow as tf
    >>> from sim_merlin.kernels import model_ops, prelu
    >>> if model_ops.available():
    ...     y = prelu.prelu(tf.constant([[2.0, -2.0]]), tf.constant([0.1, 0.5]))
    ...     assert y.numpy().tolist() == [[2.0, -1.0]]
"""
from __future__ import annotations

import sim_merlin.tf_compat  # noqa: F401
import tensorflow as tf

from sim_merlin.kernels.build import load as _library

DTYPES = (tf.float32, tf.bfloat16)


def prelu(inputs, alpha):
    """``inputs`` where positive, ``alpha * inputs`` where negative, 0 at 0. ``inputs`` float32 or
    bfloat16; ``alpha`` (cast to the inputs' dtype) has the shape of the inputs' trailing
    dimensions (one slope per unit)."""
    if inputs.dtype not in DTYPES:
        raise ValueError(f"prelu takes float32 or bfloat16 inputs, got {inputs.dtype.name}")
    # No threads of its own (threads=1): a pass over [batch, units] takes well under a
    # millisecond, less than starting a helper thread that must wait for a core the other ops
    # of the step keep busy; TensorFlow's intra-op pool still splits it when it has threads.
    return _library().sim_merlin_prelu(inputs, tf.cast(alpha, inputs.dtype), threads=1)


@tf.RegisterGradient("SimMerlinPrelu")
def _prelu_gradient(op, outputs_grad):
    inputs_grad, alpha_grad = _library().sim_merlin_prelu_grad(
        op.inputs[0], op.inputs[1], outputs_grad, threads=op.get_attr("threads"))
    return [inputs_grad, alpha_grad]


tf.no_gradient("SimMerlinPreluGrad")
