"""DIEN (Zhou et al., 2019): interest extraction and attention-gated evolution over behaviours.

``logit = LogitMLP([target | AUGRU interest | user])``, trained with the auxiliary loss. By
default DIEN reads the whole history with masked recurrences; ``reference_compatible=True``
reproduces the reference, which reads only the ``short_length`` newest behaviours and runs its
recurrences over padding (and uses no dropout).

Example::

    >>> import sim_merlin.tf_compat  # noqa: F401
    >>> from sim_merlin.schema import sample_schema
    >>> schema = sample_schema({"item_id": 100, "category_id": 9}, {"user_id": 20}, 20)
    >>> type(DIENModel(schema, embedding_dim=4)).__name__
    'Model'
"""
from __future__ import annotations

import sim_merlin.tf_compat  # noqa: F401
import merlin.models.tf as mm
import tensorflow as tf
from merlin.schema import Schema

from sim_merlin.blocks.inputs import BehaviourEmbeddings
from sim_merlin.blocks.interest import AuxiliaryLoss, InterestEvolution, InterestExtractor
from sim_merlin.blocks.mlp import LogitMLP
from sim_merlin.blocks.serialization import SchemaConfigMixin
from sim_merlin.models.losses import labels_from, logit_cross_entropy
from sim_merlin.models.sim import binary_output


@tf.keras.utils.register_keras_serializable(package="sim_merlin")
class DIENBlock(SchemaConfigMixin, mm.Block):
    """Features dict -> logit [batch, 1]; adds the auxiliary loss in training and evaluation."""

    def __init__(self, schema: Schema, embedding_dim: int = 16, short_length: int = 10,
                 gru_units: int | None = None, mlp_dims=(200, 80), aux_mlp_dims=(100, 50),
                 dropout_rate: float = 0.0, reference_compatible: bool = False, **kwargs):
        super().__init__(**kwargs)
        self._schema = schema
        self.embedding_dim = int(embedding_dim)
        self.short_length = int(short_length)
        self.gru_units = int(gru_units or 6 * self.embedding_dim)
        self.mlp_dims = tuple(int(d) for d in mlp_dims)
        self.aux_mlp_dims = tuple(int(d) for d in aux_mlp_dims)
        self.reference_compatible = bool(reference_compatible)
        self.dropout_rate = 0.0 if reference_compatible else float(dropout_rate)
        use_mask = not reference_compatible
        self.embeddings = BehaviourEmbeddings(schema, self.embedding_dim, self.short_length)
        self.extractor = InterestExtractor(self.gru_units, use_mask=use_mask)
        self.evolution = InterestEvolution(self.gru_units, use_mask=use_mask)
        self.mlp = LogitMLP(self.mlp_dims, self.dropout_rate)
        self.auxiliary = AuxiliaryLoss(self.aux_mlp_dims, self.dropout_rate,
                                       reference_compatible=reference_compatible)

    def _forward(self, inputs, training=False, auxiliary=True):
        if self.reference_compatible:
            keys = ("short", "short_mask", "short_negative")
        else:
            keys = ("history", "history_mask", "negative")
        # The negative history feeds only the auxiliary loss: not looked up without it.
        wanted = keys if auxiliary else keys[:2]
        e = self.embeddings(inputs, outputs=("user", "target", *wanted))
        sequence, mask, negative = (e.get(key) for key in keys)
        states = self.extractor(sequence, mask, training=training)
        interest = self.evolution(e["target"], states, mask, training=training)
        logit = self.mlp(tf.concat([e["target"], interest, e["user"]], axis=-1), training=training)
        return logit, (states, sequence, negative, mask)

    def loss_terms(self, inputs, labels, training=False) -> dict:
        """The ``logit`` [batch, 1], its ``classification_loss`` (BCE) and ``auxiliary_loss``."""
        logit, auxiliary_inputs = self._forward(inputs, training=training)
        return {"logit": logit, "classification_loss": logit_cross_entropy(labels, logit),
                "auxiliary_loss": self.auxiliary(*auxiliary_inputs, training=training)}

    def call(self, inputs, targets=None, training=False, testing=False):
        auxiliary = labels_from(targets) is not None and (training or testing)
        logit, auxiliary_inputs = self._forward(inputs, training=training, auxiliary=auxiliary)
        if auxiliary:
            self.add_loss(self.auxiliary(*auxiliary_inputs, training=training))
        return logit

    def get_config(self):
        config = super().get_config()
        config.update(embedding_dim=self.embedding_dim, short_length=self.short_length,
                      gru_units=self.gru_units, mlp_dims=list(self.mlp_dims),
                      aux_mlp_dims=list(self.aux_mlp_dims), dropout_rate=self.dropout_rate,
                      reference_compatible=self.reference_compatible)
        return self._config_with_schema(config)


def DIENModel(schema: Schema, **kwargs) -> mm.Model:
    """A Merlin ``Model`` of DIEN over ``schema`` (options: :class:`DIENBlock`)."""
    return mm.Model(DIENBlock(schema, **kwargs), binary_output(schema))
