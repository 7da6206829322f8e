"""The fused GRU and AUGRU recurrences as TensorFlow ops with their gradients.

:func:`gru` and :func:`augru` take the input projection of every step already computed (one large
product that stays in TensorFlow) and run the state recurrence of a block of rows in one C++
pass; their gradients are single ops as well. Element-wise work is float32; the products are
float32, or, for bfloat16 inputs (``mixed_bfloat16``), bfloat16 products with float32 sums as
TensorFlow's own products under that policy (on CPUs with AVX512-BF16). The projections, the
states and their gradients stay in the model's dtype (a kernel converts each block of rows), so
no cast op passes over them; the result has the input's dtype. The blocks use them where
:func:`sim_merlin.kernels.model_ops.available` holds, and their plain TensorFlow recurrences,
which compute the same values, elsewhere.

Example::

    >>> import sim_merlin.tf_compat  # noqa: F401
    >>> import tensorflow as tf
    >>> from sim_merlin.kernels import model_ops, recurrent
    >>> if model_ops.available():
    ...     states = recurrent.gru(tf.zeros([2, 5, 6]), tf.zeros([2, 6]), tf.zeros([6]),
    ...                            tf.ones([2, 5]))
    ...     assert states.shape == (2, 5, 2)
"""
from __future__ import annotations

import sim_merlin.tf_compat  # noqa: F401
import tensorflow as tf

from sim_merlin.kernels.build import load as _library, threads as _threads


def _float32(*tensors):
    return [tf.cast(t, tf.float32) for t in tensors]


def model_dtype(tensor):
    """``tensor`` as the kernels take their large inputs: float32 or bfloat16 (converted block by
    block inside the kernel, no cast op over the whole tensor); other dtypes as float32."""
    return tensor if tensor.dtype in (tf.float32, tf.bfloat16) else tf.cast(tensor, tf.float32)


def gru(projected, recurrent_kernel, recurrent_bias, mask):
    """Keras's GRU recurrence (``reset_after=True``, gates z, r, h) -> states [B, T, u].

    ``projected`` [B, T, 3u] is ``x @ kernel + input_bias``; ``mask`` [B, T] (1 = the step is
    taken, 0 = the state is carried over).
    """
    dtype = projected.dtype
    states = _library().sim_merlin_gru(
        model_dtype(projected),
        *_float32(recurrent_kernel, tf.reshape(recurrent_bias, [-1]), mask),
        bf16_products=dtype == tf.bfloat16, threads=_threads())
    return tf.cast(states, dtype)


def augru(projected, gate_kernel, candidate_kernel, scores, mask):
    """DIEN's AUGRU recurrence (``sim_merlin.blocks.interest.AUGRUCell``) -> last state [B, u].

    ``projected`` [B, T, 3u] is ``x @ [W_gates_x | W_candidate_x] + [b_gates | b_candidate]``;
    ``gate_kernel`` [u, 2u] and ``candidate_kernel`` [u, u] the state's parts of the kernels;
    ``scores`` [B, T] the attention scores; ``mask`` [B, T].
    """
    dtype = projected.dtype
    final = _library().sim_merlin_augru(
        model_dtype(projected), *_float32(gate_kernel, candidate_kernel, scores, mask),
        bf16_products=dtype == tf.bfloat16, threads=_threads())
    return tf.cast(final, dtype)


@tf.RegisterGradient("SimMerlinGru")
def _gru_gradient(op, states_grad):
    grads = _library().sim_merlin_gru_grad(*op.inputs, op.outputs[0], states_grad,
                                           bf16_products=op.get_attr("bf16_products"),
                                           threads=op.get_attr("threads"))
    return [*grads, None]


@tf.RegisterGradient("SimMerlinAugru")
def _augru_gradient(op, final_grad):
    grads = _library().sim_merlin_augru_grad(*op.inputs, final_grad,
                                             bf16_products=op.get_attr("bf16_products"),
                                             threads=op.get_attr("threads"))
    return [*grads, None]
