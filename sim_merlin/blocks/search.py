"""SIM's General Search Unit: pick the part of a long behaviour history relevant to the target.

Two modes, as in the SIM paper (Pi et al., 2020, section 4.1):

* **soft search**: score every long-history behaviour against the target (inner product of their
  embeddings) and keep the ``top_k`` best, in decreasing score order (the reference's only mode);
* **hard search**: keep the behaviours whose category equals the target's category, the most
  recent first, up to ``top_k``.

The selection carries no gradient (indices are discrete); gradients reach the selected behaviours'
embeddings through the gather. Fewer than ``top_k`` candidates leave padded slots: zero vectors
with mask 0.

Example::

    >>> import sim_merlin.tf_compat  # noqa: F401
    >>> import tensorflow as tf
    >>> gsu = GeneralSearchUnit(mode="hard", top_k=2)
    >>> history = tf.reshape(tf.range(4, dtype=tf.float32), [1, 4, 1])   # oldest .. newest
    >>> selected, mask = gsu(tf.ones([1, 1]), history, tf.ones([1, 4]),
    ...                      target_category=tf.constant([7]),
    ...                      history_categories=tf.constant([[7, 5, 7, 7]]))
    >>> selected.numpy().ravel().tolist(), mask.numpy().tolist()
    ([3.0, 2.0], [[True, True]])
"""
from __future__ import annotations

import sim_merlin.tf_compat  # noqa: F401
import merlin.models.tf as mm
import tensorflow as tf

from sim_merlin.blocks.attention import dot_scores
from sim_merlin.blocks.sequence import dense_sequence
from sim_merlin.kernels import model_ops, top_k_mask as fused_top_k

MODES = ("soft", "hard")


@tf.keras.utils.register_keras_serializable(package="sim_merlin")
class GeneralSearchUnit(mm.Block):
    """Select ``top_k`` behaviours of the long history for a target (SIM's GSU).

    Inputs: ``query`` [batch, dim] (the target's embedding), ``history`` [batch, length, dim]
    (left-padded, newest last; or ragged), ``mask`` [batch, length]; for hard search also
    ``target_category`` [batch] and ``history_categories`` [batch, length].

    Returns ``(selected [batch, top_k, dim], selected_mask [batch, top_k])``; with
    ``return_indices=True`` also the positions picked in ``history`` [batch, top_k] (-1 for empty
    slots). Soft search orders by decreasing score, hard search from the newest.
    """

    def __init__(self, mode: str = "soft", top_k: int = 50, **kwargs):
        super().__init__(**kwargs)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if int(top_k) < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.mode = mode
        self.top_k = int(top_k)

    def relevance(self, query, history, mask, target_category=None, history_categories=None,
                  scores=None):
        """[batch, length] ranking keys; invalid candidates get the lowest value. Soft search
        ranks by the inner products ``scores`` [batch, length] if given (computed by the
        caller for another use), else computes them."""
        # Ranking in float32 even under mixed precision: bf16 cannot tell positions > 256 apart.
        if self.mode == "soft":
            keys = tf.cast(dot_scores(query, history) if scores is None else scores, tf.float32)
            valid = mask
        else:
            if target_category is None or history_categories is None:
                raise ValueError("hard search needs target_category and history_categories")
            same = tf.equal(
                tf.cast(history_categories, tf.int64),
                tf.expand_dims(tf.cast(tf.reshape(target_category, [-1]), tf.int64), 1),
            )
            valid = tf.logical_and(mask, same)
            # Most recent first: later positions rank higher (newest is last).
            keys = tf.cast(tf.range(tf.shape(history)[1]), tf.float32)
            keys = tf.broadcast_to(keys, tf.shape(valid))
        lowest = tf.constant(keys.dtype.min, keys.dtype)
        return tf.where(valid, keys, lowest), valid

    def _top(self, query, history, mask, target_category, history_categories, ordered=True,
             scores=None):
        """(dense history, validity [batch, length], top-k positions [batch, k], k); the
        positions by decreasing relevance when ``ordered``, else in any order (faster)."""
        if isinstance(history_categories, tf.RaggedTensor):
            history_categories, _ = dense_sequence(history_categories)
        history, mask = dense_sequence(history, mask)
        keys, valid = self.relevance(query, history, mask, target_category, history_categories,
                                     scores)
        k = tf.minimum(self.top_k, tf.shape(history)[1])
        _, indices = tf.math.top_k(tf.stop_gradient(keys), k=k, sorted=ordered)
        return history, valid, indices, k

    def selection_mask(self, query, history, mask, target_category=None,
                       history_categories=None, scores=None) -> tf.Tensor:
        """The selection as a mask over ``history``'s positions [batch, length] (bool): True
        where a behaviour is among the ``top_k`` selected. For a consumer that does not care
        about the order of the selection (SIM's ESU: attention and mean are the same for any
        order), this avoids gathering the selected embeddings; the gradient of that gather is a
        scatter, single-threaded on CPU. With a tie for the k-th place (equal scores: in
        practice the same item twice, so the same embedding) the mask may hold another of the
        tied positions than ``call()``; what the ESU computes from it is the same. ``scores``:
        see :meth:`relevance`."""
        if model_ops.available():
            # One op (sim_merlin.kernels.top_k_mask): a partial selection per row, no sort.
            if isinstance(history_categories, tf.RaggedTensor):
                history_categories, _ = dense_sequence(history_categories)
            history, mask = dense_sequence(history, mask)
            if (self.mode == "soft" and scores is None
                    and history.dtype in fused_top_k.DTYPES):
                # Soft search's scores computed in the same op, not as a batched product.
                return fused_top_k.dot_top_k_mask(tf.stop_gradient(query),
                                                  tf.stop_gradient(history), mask, self.top_k)
            keys, valid = self.relevance(query, history, mask, target_category,
                                         history_categories, scores)
            return fused_top_k.top_k_mask(tf.stop_gradient(keys), valid, self.top_k)
        history, valid, indices, _ = self._top(query, history, mask, target_category,
                                               history_categories, ordered=False, scores=scores)
        # Count the k picked positions of every row in one flat histogram (positions are
        # distinct within a row): much cheaper than a [batch, k, length] one-hot.
        shape = tf.shape(valid)
        flat = indices + shape[1] * tf.range(shape[0])[:, None]
        size = shape[0] * shape[1]
        # The op itself, not tf.math.bincount: that sizes its output from the data's maximum,
        # which XLA cannot compile; here the size comes from the shape alone.
        picked = tf.raw_ops.DenseBincount(input=tf.reshape(flat, [-1]), size=size,
                                          weights=tf.zeros([0], flat.dtype), binary_output=True)
        return tf.logical_and(tf.reshape(picked, shape) > 0, valid)

    def call(self, query, history=None, mask=None, target_category=None,
             history_categories=None, return_indices=False, training=False):
        if isinstance(query, (list, tuple)):
            query, history, mask, *rest = query
            if rest:
                target_category, history_categories = rest
        history, valid, indices, k = self._top(query, history, mask, target_category,
                                               history_categories)
        picked_valid = tf.gather(valid, indices, batch_dims=1)
        selected = tf.gather(history, indices, batch_dims=1)
        selected = selected * tf.cast(tf.expand_dims(picked_valid, -1), selected.dtype)
        indices = tf.where(picked_valid, indices, -tf.ones_like(indices))
        # Always top_k slots, whatever the history length.
        pad = self.top_k - k
        selected = tf.pad(selected, [[0, 0], [0, pad], [0, 0]])
        picked_valid = tf.pad(picked_valid, [[0, 0], [0, pad]])
        indices = tf.pad(indices, [[0, 0], [0, pad]], constant_values=-1)
        dim = history.shape[-1]
        selected = tf.ensure_shape(selected, [None, self.top_k, dim])
        picked_valid = tf.ensure_shape(picked_valid, [None, self.top_k])
        if return_indices:
            return selected, picked_valid, tf.ensure_shape(indices, [None, self.top_k])
        return selected, picked_valid

    def compute_output_shape(self, input_shape):
        history_shape = tf.TensorShape(input_shape[1])
        return (
            tf.TensorShape([history_shape[0], self.top_k, history_shape[-1]]),
            tf.TensorShape([history_shape[0], self.top_k]),
        )

    def get_config(self):
        config = super().get_config()
        config.update(mode=self.mode, top_k=self.top_k)
        return config
