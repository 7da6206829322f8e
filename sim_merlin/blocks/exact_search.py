"""SIM's Exact Search Unit: attend from the target over the behaviours the GSU selected.

Two attention variants:

* ``attention="dot"``: one parameter-free dot-product softmax attention, what the reference
  computes (its README calls it multi-head attention);
* ``attention="multihead"``: the SIM paper's multi-head target attention: the target is the query,
  the selected behaviours the keys and values, each of ``heads`` heads has its own projections of
  size ``head_dim`` and a scaled softmax over the valid behaviours; the heads are concatenated.

Beside the attention output the unit returns the masked mean of the selected behaviours.
The reference divides their sum by ``count + 1`` (``mean_denominator="count_plus_one"``); the
default divides by the count (0 for an empty selection).

Example::

    >>> import sim_merlin.tf_compat  # noqa: F401
    >>> import tensorflow as tf
    >>> esu = ExactSearchUnit(attention="dot")
    >>> out = esu(tf.ones([2, 4]), tf.ones([2, 3, 4]), tf.constant([[1, 1, 0], [0, 0, 0]]))
    >>> out.shape.as_list()        # [attention (4) | mean (4)]
    [2, 8]
"""
from __future__ import annotations

import sim_merlin.tf_compat  # noqa: F401
import merlin.models.tf as mm
import tensorflow as tf

from sim_merlin.blocks.attention import TargetAttention
from sim_merlin.blocks.sequence import dense_sequence

ATTENTIONS = ("dot", "multihead")
MEAN_DENOMINATORS = ("count", "count_plus_one")


def masked_mean(values: tf.Tensor, mask: tf.Tensor, plus_one: bool = False) -> tf.Tensor:
    """Mean of ``values`` [batch, length, dim] over ``mask``; 0 for rows with nothing valid."""
    weights = tf.cast(mask, values.dtype)
    return mean_of_sum(tf.reduce_sum(values * tf.expand_dims(weights, -1), axis=1), mask,
                       plus_one)


def mean_of_sum(total: tf.Tensor, mask: tf.Tensor, plus_one: bool = False) -> tf.Tensor:
    """``total`` [batch, dim], the sum over ``mask`` [batch, length], divided by the count
    (0 for a count of 0) or, with ``plus_one``, by count + 1 (the reference)."""
    count = tf.reduce_sum(tf.cast(mask, total.dtype), axis=1, keepdims=True)
    return total / (count + 1.0) if plus_one else tf.math.divide_no_nan(total, count)


@tf.keras.utils.register_keras_serializable(package="sim_merlin")
class ExactSearchUnit(mm.Block):
    """Target attention over selected behaviours plus their mean (SIM's ESU).

    Inputs: ``query`` [batch, query_dim], ``selected`` [batch, k, dim], ``mask`` [batch, k].
    Output: ``[attention | mean]``, [batch, attention_dim + dim], where attention_dim is ``dim``
    for ``"dot"`` and ``heads * head_dim`` for ``"multihead"`` (``head_dim`` defaults to
    ``dim // heads``). ``include_mean=False`` returns the attention part only.
    """

    def __init__(
        self,
        attention: str = "multihead",
        heads: int = 4,
        head_dim: int | None = None,
        include_mean: bool = True,
        mean_denominator: str = "count",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        if mean_denominator not in MEAN_DENOMINATORS:
            raise ValueError(
                f"mean_denominator must be one of {MEAN_DENOMINATORS}, got {mean_denominator!r}"
            )
        if int(heads) < 1:
            raise ValueError(f"heads must be >= 1, got {heads}")
        self.attention = attention
        self.heads = int(heads)
        self.head_dim = None if head_dim is None else int(head_dim)
        self.include_mean = bool(include_mean)
        self.mean_denominator = mean_denominator
        self.dot_attention = TargetAttention("dot", normalize=True) if attention == "dot" else None

    def _build_projections(self, dim: int) -> None:
        """Created on the first call, when the behaviours' width is known (Keras builds a
        layer from its first argument only, here the query)."""
        self._head_dim = self.head_dim or max(1, dim // self.heads)
        width = self.heads * self._head_dim
        self.query_projection = tf.keras.layers.Dense(width, use_bias=False, name="query")
        self.key_projection = tf.keras.layers.Dense(width, use_bias=False, name="key")
        self.value_projection = tf.keras.layers.Dense(width, use_bias=False, name="value")

    def _multihead(self, query, selected, mask):
        batch = tf.shape(selected)[0]
        length = tf.shape(selected)[1]
        q = tf.reshape(self.query_projection(query), [batch, self.heads, 1, self._head_dim])
        k = tf.reshape(self.key_projection(selected), [batch, length, self.heads, self._head_dim])
        v = tf.reshape(self.value_projection(selected), [batch, length, self.heads, self._head_dim])
        k = tf.transpose(k, [0, 2, 1, 3])  # [batch, heads, length, head_dim]
        v = tf.transpose(v, [0, 2, 1, 3])
        scores = tf.matmul(q, k, transpose_b=True)[:, :, 0, :]  # [batch, heads, length]
        scores = scores / tf.cast(tf.sqrt(float(self._head_dim)), scores.dtype)
        valid = tf.expand_dims(mask, 1)
        scores = tf.where(valid, scores, tf.constant(scores.dtype.min, scores.dtype))
        weights = tf.where(valid, tf.nn.softmax(scores, axis=-1), tf.zeros_like(scores))
        heads = tf.reduce_sum(tf.expand_dims(weights, -1) * v, axis=2)  # [batch, heads, head_dim]
        return tf.reshape(heads, [batch, self.heads * self._head_dim]), weights

    def call(self, query, selected=None, mask=None, return_weights=False, training=False):
        if isinstance(query, (list, tuple)):
            query, selected, mask = query
        selected, mask = dense_sequence(selected, mask)
        if self.attention == "dot":
            attended, weights = self.dot_attention(query, selected, mask, return_weights=True)
        else:
            if not hasattr(self, "query_projection"):
                self._build_projections(int(selected.shape[-1]))
            attended, weights = self._multihead(query, selected, mask)
        outputs = attended
        if self.include_mean:
            mean = masked_mean(selected, mask, self.mean_denominator == "count_plus_one")
            outputs = tf.concat([attended, mean], axis=-1)
        return (outputs, weights) if return_weights else outputs

    def get_config(self):
        config = super().get_config()
        config.update(
            attention=self.attention,
            heads=self.heads,
            head_dim=self.head_dim,
            include_mean=self.include_mean,
            mean_denominator=self.mean_denominator,
        )
        return config
