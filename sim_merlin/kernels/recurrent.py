"""The fused GRU and AUGRU recurrences as TensorFlow ops with their gradients.

:func:`gru` and :func:`augru` run the whole layer over a block of rows in one C++ pass: the
input projection of every step (one product per block), then the state recurrence; their
gradients are single ops as well. Element-wise work is float32; the products are
float32, or, for bfloat16 inputs (``mixed_bfloat16``), bfloat16 products with float32 sums as
TensorFlow's own products under that policy (on AMX or AVX512-BF16). The sequences, the states
and their gradients stay in the model's dtype (a kernel converts each block of rows), so no cast
op passes over them; the result has the input's dtype. The blocks use them where
:func:`sim_merlin.kernels.model_ops.available` holds, and their plain TensorFlow recurrences,
which compute the same values, elsewhere.

Example::

    >>> import sim_merlin.tf_compat  # noqa: F401
    >>> import tensorflow as tf
    >>> from sim_merlin.kernels import model_ops, recurrent
    >>> if model_ops.available():
    ...     states = recurrent.gru(tf.zeros([2, 5, 4]), tf.zeros([4, 6]), tf.zeros([6]),
    ...                            tf.zeros([2, 6]), tf.zeros([6]), tf.ones([2, 5]))
    ...     assert states.shape == (2, 5, 2)
"""
from __future__ import annotations

import os

import sim_merlin.tf_compat  # noqa: F401
import tensorflow as tf

from sim_merlin.kernels.build import cpu_has_amx, load as _library, threads as _threads


def _float32(*tensors):
    return [tf.cast(t, tf.float32) for t in tensors]


def model_dtype(tensor):
    """``tensor`` as the kernels take their large inputs: float32 or bfloat16 (converted block by
    block inside the kernel, no cast op over the whole tensor); other dtypes as float32."""
    return tensor if tensor.dtype in (tf.float32, tf.bfloat16) else tf.cast(tensor, tf.float32)


def gru(sequence, kernel, input_bias, recurrent_kernel, recurrent_bias, mask,
        keep_activations=False):
    """Keras's GRU (``reset_after=True``, gates z, r, h) over ``sequence`` [B, T, F] -> states
    [B, T, u].

    ``kernel`` [F, 3u], ``input_bias`` [3u], ``recurrent_kernel`` [u, 3u], ``recurrent_bias``
    [3u] (Keras's ``bias`` is ``[input_bias, recurrent_bias]``); ``mask`` [B, T] (1 = the step
    is taken, 0 = the state is carried over). ``keep_activations``: the op keeps its gates and
    candidates (4u floats per row and step) so the gradient does not recompute them; for
    training steps (see :func:`training_keeps_activations`). The same values and gradients
    either way.
    """
    dtype = sequence.dtype
    states, _ = _library().sim_merlin_gru(
        model_dtype(sequence),
        *_float32(kernel, tf.reshape(input_bias, [-1]), recurrent_kernel,
                  tf.reshape(recurrent_bias, [-1]), mask),
        keep_activations=bool(keep_activations), bf16_products=dtype == tf.bfloat16,
        threads=_threads())
    return tf.cast(states, dtype)


def amx_products() -> bool:
    """Whether the kernels' bfloat16 products run on AMX tiles here: the CPU has them and
    ``SIM_MERLIN_KERNEL_AMX`` is not 0 (the kernels also need the operating system's permission,
    which Linux gives where the CPU has them)."""
    return os.environ.get("SIM_MERLIN_KERNEL_AMX") != "0" and cpu_has_amx()


def training_keeps_activations() -> bool:
    """Whether a training step's GRU and AUGRU keep their activations for their gradients
    (``SIM_MERLIN_KEEP_ACTIVATIONS`` 1 or 0, else: where the products are not on AMX). Keeping
    them writes and reads some 15 KB per row each (u = 96, T = 10) instead of running the
    forward products again in the gradient: faster where products are the slow part
    (AVX512-BF16: a SIM step spends two fifths of its CPU in them), slower on AMX, where the
    products are cheap."""
    wanted = os.environ.get("SIM_MERLIN_KEEP_ACTIVATIONS")
    if wanted in ("0", "1"):
        return wanted == "1"
    return not amx_products()


def augru(sequence, kernel, input_bias, gate_kernel, candidate_kernel, scores, mask,
          keep_activations=False):
    """DIEN's AUGRU (``sim_merlin.blocks.interest.AUGRUCell``) over ``sequence`` [B, T, F] -> the
    last state [B, u].

    ``kernel`` [F, 3u] and ``input_bias`` [3u] are the input's parts of the gate and candidate
    layers, ``[W_gates_x | W_candidate_x]`` and ``[b_gates | b_candidate]``; ``gate_kernel``
    [u, 2u] and ``candidate_kernel`` [u, u] their state's parts; ``scores`` [B, T] the attention
    scores; ``mask`` [B, T]. ``keep_activations``: the op keeps what its gradient needs
    ((4T + 1) u floats per row) so the gradient does not run the forward pass again; for
    training steps (see :func:`training_keeps_activations`). The same values and gradients either
    way.
    """
    dtype = sequence.dtype
    final, _ = _library().sim_merlin_augru(
        model_dtype(sequence),
        *_float32(kernel, tf.reshape(input_bias, [-1]), gate_kernel, candidate_kernel, scores,
                  mask),
        keep_activations=bool(keep_activations), bf16_products=dtype == tf.bfloat16,
        threads=_threads())
    return tf.cast(final, dtype)


@tf.RegisterGradient("SimMerlinGru")
def _gru_gradient(op, states_grad, _activations_grad):
    grads = _library().sim_merlin_gru_grad(*op.inputs, op.outputs[0], states_grad, op.outputs[1],
                                           bf16_products=op.get_attr("bf16_products"),
                                           threads=op.get_attr("threads"))
    return [*grads, None]  # no gradient for the mask


@tf.RegisterGradient("SimMerlinAugru")
def _augru_gradient(op, final_grad, _activations_grad):
    grads = _library().sim_merlin_augru_grad(*op.inputs, final_grad, op.outputs[1],
                                             bf16_products=op.get_attr("bf16_products"),
                                             threads=op.get_attr("threads"))
    return [*grads, None]  # no gradient for the mask
