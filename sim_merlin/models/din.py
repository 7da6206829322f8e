"""DIN (Zhou et al., 2018): target attention over the whole behaviour history.

``logit = LogitMLP([target | attention(target, history) | user])``. By default the attention is
DIN's activation unit without normalisation, as in the paper; ``reference_compatible=True`` uses
the reference's parameter-free dot product with a softmax (and, like the reference, no dropout).

Example::

    >>> import sim_merlin.tf_compat  # noqa: F401
    >>> from sim_merlin.schema import sample_schema
    >>> schema = sample_schema({"item_id": 100, "category_id": 9}, {"user_id": 20}, 20)
    >>> type(DINModel(schema, embedding_dim=4)).__name__
    'Model'
"""
from __future__ import annotations

import sim_merlin.tf_compat  # noqa: F401
import merlin.models.tf as mm
import tensorflow as tf
from merlin.schema import Schema

from sim_merlin.blocks.attention import TargetAttention
from sim_merlin.blocks.inputs import BehaviourEmbeddings
from sim_merlin.blocks.mlp import LogitMLP
from sim_merlin.blocks.serialization import SchemaConfigMixin
from sim_merlin.models.losses import logit_cross_entropy
from sim_merlin.models.sim import binary_output


@tf.keras.utils.register_keras_serializable(package="sim_merlin")
class DINBlock(SchemaConfigMixin, mm.Block):
    """Features dict -> logit [batch, 1]."""

    def __init__(self, schema: Schema, embedding_dim: int = 16, short_length: int = 10,
                 attention: str = "din", normalize: bool = False, mlp_dims=(200, 80),
                 dropout_rate: float = 0.0, reference_compatible: bool = False, **kwargs):
        super().__init__(**kwargs)
        self._schema = schema
        self.embedding_dim = int(embedding_dim)
        self.short_length = int(short_length)
        self.reference_compatible = bool(reference_compatible)
        self.attention_scoring = "dot" if reference_compatible else attention
        self.normalize = True if reference_compatible else bool(normalize)
        self.mlp_dims = tuple(int(d) for d in mlp_dims)
        self.dropout_rate = 0.0 if reference_compatible else float(dropout_rate)
        self.embeddings = BehaviourEmbeddings(schema, self.embedding_dim, self.short_length)
        self.attention = TargetAttention(self.attention_scoring, normalize=self.normalize)
        self.mlp = LogitMLP(self.mlp_dims, self.dropout_rate)

    def call(self, inputs, training=False):
        # The attention gives padded steps weight 0 (and them no gradient): the history's
        # padding need not be zeroed first.
        e = self.embeddings(inputs, outputs=("user", "target", "history_unmasked", "history_mask"))
        pooled = self.attention(e["target"], e["history_unmasked"], e["history_mask"])
        return self.mlp(tf.concat([e["target"], pooled, e["user"]], axis=-1), training=training)

    def loss_terms(self, inputs, labels, training=False) -> dict:
        """The ``logit`` [batch, 1], its ``classification_loss`` (BCE) and ``auxiliary_loss`` 0."""
        logit = self.call(inputs, training=training)
        return {"logit": logit, "classification_loss": logit_cross_entropy(labels, logit),
                "auxiliary_loss": tf.constant(0.0)}

    def get_config(self):
        config = super().get_config()
        config.update(embedding_dim=self.embedding_dim, short_length=self.short_length,
                      attention=self.attention_scoring, normalize=self.normalize,
                      mlp_dims=list(self.mlp_dims), dropout_rate=self.dropout_rate,
                      reference_compatible=self.reference_compatible)
        return self._config_with_schema(config)


def DINModel(schema: Schema, **kwargs) -> mm.Model:
    """A Merlin ``Model`` of DIN over ``schema`` (options: :class:`DINBlock`)."""
    return mm.Model(DINBlock(schema, **kwargs), binary_output(schema))
