"""Target attention: a candidate item attends over a user's behaviour sequence (DIN).

Example::

    >>> import sim_merlin.tf_compat  # noqa: F401
    >>> import tensorflow as tf
    >>> from sim_merlin.blocks.attention import TargetAttention
    >>> attention = TargetAttention(scoring="dot", normalize=True)
    >>> query = tf.ones([2, 4])                      # [batch, dim]
    >>> keys = tf.ones([2, 3, 4])                    # [batch, length, dim]
    >>> mask = tf.constant([[1, 1, 0], [0, 0, 0]])   # [batch, length]; 0 = padding
    >>> pooled, weights = attention(query, keys, mask, return_weights=True)
    >>> weights.numpy().round(2).tolist()
    [[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]]
"""
from __future__ import annotations

import sim_merlin.tf_compat  # noqa: F401  (before TensorFlow / Merlin Models)
import merlin.models.tf as mm
import tensorflow as tf

from sim_merlin.blocks.sequence import dense_sequence
from sim_merlin.kernels import dot_attention as fused_dot, model_ops, sigmoid_mlp as fused_mlp

SCORINGS = ("dot", "din")


def dot_scores(query: tf.Tensor, keys: tf.Tensor) -> tf.Tensor:
    """``<keys[b, t], query[b]>`` [batch, length] for query [batch, dim], keys [batch, length,
    dim]: a batched matrix-vector product, no [batch, length, dim] temporary."""
    return tf.squeeze(tf.matmul(keys, tf.expand_dims(tf.cast(query, keys.dtype), -1)), axis=-1)


def masked_softmax(scores: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """Softmax of ``scores`` [batch, length] over the positions where ``mask`` (bool) holds;
    exactly 0 elsewhere, and on rows with no valid position."""
    # Padding gets the dtype's lowest score, so its softmax weight underflows to 0; the explicit
    # zeroing also covers rows with no valid position at all.
    masked = tf.where(mask, scores, tf.constant(scores.dtype.min, scores.dtype))
    return tf.where(mask, tf.nn.softmax(masked, axis=-1), tf.zeros_like(scores))


@tf.keras.utils.register_keras_serializable(package="sim_merlin")
class TargetAttention(mm.Block):
    """Masked attention of a target (query) over a sequence of behaviours (keys).

    ``scoring="dot"`` is the parameter-free dot product ``<e_t, q>`` the reference uses;
    ``scoring="din"`` is DIN's activation unit, an MLP over ``[e_t, q, e_t - q, e_t * q]``
    (``hidden_units``, ``activation``; the reference's unused unit is 80-40 with sigmoid).
    ``normalize=True`` applies a softmax over the valid positions (the reference);
    ``normalize=False`` uses the raw scores as weights, as the DIN paper does.

    Inputs: ``query`` [batch, dim], ``keys`` [batch, length, dim] (dense, or ragged: padding is
    then implied), ``mask`` [batch, length] (non-zero = a real behaviour; optional for ragged keys).
    Output: the weighted sum of the keys, [batch, dim]; with ``return_weights=True`` also the
    weights [batch, length], exactly 0 on padding. A row with no valid behaviour gives zeros.
    Padded keys get weight 0 and a zero gradient, so they need not be zeroed.
    """

    def __init__(
        self,
        scoring: str = "dot",
        normalize: bool = True,
        hidden_units: tuple[int, ...] = (80, 40),
        activation: str = "sigmoid",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
        self.scoring = scoring
        self.normalize = bool(normalize)
        self.hidden_units = tuple(int(u) for u in hidden_units)
        self.activation = activation
        self.score_layers = []  # DIN's activation unit (a list: its first layer is split)
        if scoring == "din":
            self.score_layers = [
                tf.keras.layers.Dense(u, activation=activation, name=f"activation_unit_{i}")
                for i, u in enumerate(self.hidden_units)
            ] + [tf.keras.layers.Dense(1, name="activation_unit_score")]

    def scores(self, query: tf.Tensor, keys: tf.Tensor) -> tf.Tensor:
        """Unmasked attention scores [batch, length]."""
        if self.scoring == "dot":
            return dot_scores(query, keys)
        return self._activation_unit(query, keys)

    def _activation_unit(self, query, keys):
        """The MLP over ``[e, q, e - q, e * q]``, its first layer computed without the concat:
        ``[e, q, e - q, e * q] W = [e, e * q] [[W_e + W_d], [W_p]] + q (W_q - W_d)``, so the
        query's part is computed once per row instead of once per step (same function, same
        weights: ``W`` is the first Dense layer's kernel, split in four)."""
        first, *rest = self.score_layers
        dim = keys.shape[-1]
        if not first.built:
            with tf.init_scope():
                first.build(tf.TensorShape([None, 4 * dim]))
        w_key, w_query, w_diff, w_prod = tf.split(first.kernel, 4, axis=0)
        query = tf.cast(query, keys.dtype)
        shape = tf.shape(keys)
        if self.activation == "sigmoid" and model_ops.available():
            # The whole unit as one op (sim_merlin.kernels.sigmoid_mlp), same function: the query
            # is a group input shared by a sample's steps, e * q its product term.
            kernels, biases = fused_mlp.keras_weights(rest, first.units)
            scores = fused_mlp.sigmoid_mlp(
                tf.reshape(keys, [-1, dim]), [w_key + w_diff, *kernels], [first.bias, *biases],
                groups=query, group_kernel=w_query - w_diff, product_kernel=w_prod)
            return tf.reshape(tf.cast(scores, keys.dtype), shape[:2])
        per_step = tf.concat([keys, keys * tf.expand_dims(query, 1)], axis=-1)
        per_step = tf.reshape(per_step, [-1, 2 * dim])
        w_step = tf.concat([w_key + w_diff, w_prod], axis=0)
        per_row = tf.nn.bias_add(tf.matmul(query, tf.cast(w_query - w_diff, keys.dtype)),
                                 tf.cast(first.bias, keys.dtype))
        hidden = tf.matmul(per_step, tf.cast(w_step, keys.dtype))
        hidden = tf.reshape(hidden, tf.stack([shape[0], shape[1], hidden.shape[-1]]))
        # The other layers on a 2-D [batch * length, units] input: product, bias and activation
        # then run as one fused oneDNN kernel (Keras's 3-D path, tensordot, does not fuse).
        scores = first.activation(tf.reshape(hidden + tf.expand_dims(per_row, 1),
                                             [-1, hidden.shape[-1]]))
        for layer in rest:
            scores = layer(scores)
        return tf.reshape(scores, shape[:2])

    def call(self, query, keys=None, mask=None, return_weights=False, training=False):
        if isinstance(query, (list, tuple)):
            query, keys, *rest = query
            mask = rest[0] if rest else mask
        keys, mask = dense_sequence(keys, mask)
        mask = tf.cast(mask, tf.bool)
        if (self.scoring == "dot" and self.normalize and keys.dtype in fused_dot.DTYPES
                and model_ops.available()):
            # One op each way (sim_merlin.kernels.dot_attention): the same function.
            pooled, weights = fused_dot.dot_attention(query, keys, mask)
            return (pooled, weights) if return_weights else pooled
        scores = self.scores(query, keys)
        if self.normalize:
            weights = masked_softmax(scores, mask)
        else:
            weights = tf.where(mask, scores, tf.zeros_like(scores))
        pooled = tf.squeeze(tf.matmul(tf.expand_dims(tf.cast(weights, keys.dtype), 1), keys), 1)
        if return_weights:
            return pooled, weights
        return pooled

    def compute_output_shape(self, input_shape):
        query_shape = input_shape[0] if isinstance(input_shape, (list, tuple)) else input_shape
        return tf.TensorShape(query_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            scoring=self.scoring,
            normalize=self.normalize,
            hidden_units=list(self.hidden_units),
            activation=self.activation,
        )
        return config
