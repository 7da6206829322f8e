"""SIM: the Search-based Interest Model as a Merlin Models block and model.

Stage one (the General Search Unit's model): the target attends (dot product, softmax) over the
long history; ``LogitMLP(stage_one_mlp_dims)`` scores ``[target | pooled | user]``. The GSU then
selects ``top_k`` long-history behaviours (soft or hard search). Stage two: the Exact Search Unit
attends over the selection (``[attention | mean]``), DIEN's interest extractor and evolution run
over the short history, and ``LogitMLP(stage_two_mlp_dims)`` scores
``[esu | target | interest | user]``. The loss is ``0.5 * (BCE1 + BCE2) + auxiliary``; the
prediction is stage two.

``reference_compatible=True`` reproduces NVIDIA's reference where we deliberately differ: soft
search only, a single dot-product ESU, a mean divided by ``count + 1``, recurrent layers run over
padding, and the reference's auxiliary loss normalisation.

Example::

    >>> import sim_merlin.tf_compat  # noqa: F401
    >>> from sim_merlin.schema import sample_schema
    >>> schema = sample_schema({"item_id": 100, "category_id": 9}, {"user_id": 20}, 20)
    >>> model = SIMModel(schema, embedding_dim=4, short_length=5, top_k=6)
    >>> type(model).__name__
    'Model'
"""
from __future__ import annotations

import sim_merlin.tf_compat  # noqa: F401
import merlin.models.tf as mm
import tensorflow as tf
from merlin.schema import Schema, Tags

from sim_merlin.blocks.attention import TargetAttention, dot_scores, masked_softmax
from sim_merlin.blocks.exact_search import ExactSearchUnit, mean_of_sum
from sim_merlin.blocks.inputs import BehaviourEmbeddings
from sim_merlin.blocks.interest import AuxiliaryLoss, InterestEvolution, InterestExtractor
from sim_merlin.blocks.mlp import LogitMLP
from sim_merlin.blocks.search import GeneralSearchUnit
from sim_merlin.blocks.serialization import SchemaConfigMixin
from sim_merlin.kernels import dot_attention as fused_dot, model_ops
from sim_merlin.models.losses import ScaledBinaryCrossentropy, labels_from, logit_cross_entropy

# What SIM reads of BehaviourEmbeddings' outputs (plus "short_negative" for the auxiliary loss).
EMBEDDED = ("user", "target", "long", "long_mask", "short", "short_mask", "target_search_key",
            "long_search_keys")


def weighted_reads(history, query, weights_of):
    """``weights @ history`` [batch, W, dim] with ``weights = weights_of(scores)`` [batch, W,
    length] and ``scores = dot_scores(query, history)``, whose gradient into ``history`` is one
    batched product, ``[d scores | weights^T] @ [query ; d sums]``: as two products (the
    scores' and the sums'), TensorFlow would sum two [batch, length, dim] gradients (in
    bfloat16, 23 ms per step for SIM's long history). ``weights_of`` must hold no variables."""
    query = tf.cast(query, history.dtype)

    @tf.custom_gradient
    def read(history, query):
        scores = dot_scores(query, history)
        with tf.GradientTape() as tape:
            tape.watch(scores)
            weights = weights_of(scores)
        sums = tf.matmul(weights, history)

        def gradient(d_sums):
            d_sums = tf.cast(d_sums, history.dtype)
            d_weights = tf.matmul(d_sums, history, transpose_b=True)
            d_scores = tape.gradient(weights, scores, output_gradients=d_weights)
            left = tf.concat([d_scores[:, :, None], tf.transpose(weights, [0, 2, 1])], axis=2)
            right = tf.concat([query[:, None, :], d_sums], axis=1)
            d_query = tf.squeeze(tf.matmul(d_scores[:, None, :], history), axis=1)
            return tf.matmul(left, right), d_query

        return sums, gradient

    return read(history, query)


@tf.keras.utils.register_keras_serializable(package="sim_merlin")
class SIMBlock(SchemaConfigMixin, mm.Block):
    """Features dict -> stage-two logit [batch, 1]; adds the stage-one and auxiliary losses."""

    def __init__(
        self,
        schema: Schema,
        embedding_dim: int = 16,
        short_length: int = 10,
        top_k: int = 50,
        search_mode: str = "soft",
        search_feature: str | None = None,
        esu_attention: str = "multihead",
        esu_heads: int = 4,
        stage_one_mlp_dims=(200,),
        stage_two_mlp_dims=(200, 80),
        aux_mlp_dims=(100, 50),
        gru_units: int | None = None,
        dropout_rate: float = 0.0,
        reference_compatible: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self._schema = schema
        self.embedding_dim = int(embedding_dim)
        self.short_length = int(short_length)
        self.top_k = int(top_k)
        self.search_mode = "soft" if reference_compatible else search_mode
        self.search_feature = search_feature
        self.esu_attention = "dot" if reference_compatible else esu_attention
        self.esu_heads = int(esu_heads)
        self.stage_one_mlp_dims = tuple(int(d) for d in stage_one_mlp_dims)
        self.stage_two_mlp_dims = tuple(int(d) for d in stage_two_mlp_dims)
        self.aux_mlp_dims = tuple(int(d) for d in aux_mlp_dims)
        self.gru_units = int(gru_units or 6 * self.embedding_dim)
        self.dropout_rate = float(dropout_rate)
        self.reference_compatible = bool(reference_compatible)

        self.embeddings = BehaviourEmbeddings(schema, self.embedding_dim, self.short_length,
                                              search_feature)
        self.long_attention = TargetAttention("dot", normalize=True)
        self.stage_one = LogitMLP(self.stage_one_mlp_dims, self.dropout_rate, name="stage_one")
        self.search = GeneralSearchUnit(self.search_mode, self.top_k)
        self.exact_search = ExactSearchUnit(
            self.esu_attention, heads=self.esu_heads,
            mean_denominator="count_plus_one" if reference_compatible else "count",
        )
        use_mask = not reference_compatible
        self.extractor = InterestExtractor(self.gru_units, use_mask=use_mask)
        self.evolution = InterestEvolution(self.gru_units, use_mask=use_mask)
        self.stage_two = LogitMLP(self.stage_two_mlp_dims, self.dropout_rate, name="stage_two")
        self.auxiliary = AuxiliaryLoss(self.aux_mlp_dims, self.dropout_rate,
                                       reference_compatible=reference_compatible)

    def forward(self, inputs, training=False, auxiliary=True) -> dict:
        """All intermediate results: ``stage_one`` and ``stage_two`` logits [batch, 1], the
        embedded inputs ``embedded``, the GSU's ``selection`` as a mask over the long history
        [batch, long length] and the interest ``states``. ``auxiliary=False``: the negative
        history (read only by the auxiliary loss) is not looked up."""
        wanted = EMBEDDED + (("short_negative",) if auxiliary else ())
        if self._weights_long_history():  # its readers zero the padded steps' weights
            wanted = tuple("long_unmasked" if key == "long" else key for key in wanted)
        e = self.embeddings(inputs, outputs=wanted)
        user, target = e["user"], e["target"]
        pooled, selection, exact = self.read_long_history(e)
        stage_one = self.stage_one(tf.concat([target, pooled, user], axis=-1), training=training)
        states = self.extractor(e["short"], e["short_mask"], training=training)
        interest = self.evolution(target, states, e["short_mask"], training=training)
        stage_two = self.stage_two(tf.concat([exact, target, interest, user], axis=-1),
                                   training=training)
        return {"stage_one": stage_one, "stage_two": stage_two, "embedded": e,
                "selection": selection, "states": states}

    def _weights_long_history(self) -> bool:
        """The dot-product ESU path of :meth:`read_long_history`: the long history is only read
        through weights that are zero on padded steps (masked softmax, the GSU's selection) and
        scores that are masked before use, so it needs no zeroing of those steps."""
        return self.exact_search.attention == "dot" and self.exact_search.include_mean

    def read_long_history(self, e: dict):
        """Stage one's attention over the long history [batch, dim], the GSU's selection as a
        mask over it [batch, long length] and the ESU's output, from the embedded inputs ``e``.

        The ESU is order-free (attention and mean over a set): it reads the GSU's choice as a
        mask over the long history, the same result as over the gathered ``top_k`` behaviours.
        With a dot-product ESU (the reference's), both attentions score the same target against
        the same behaviours: the scores are computed once (they are also soft search's keys)
        and the three weighted sums (stage one's attention, the ESU's attention and sum) are one
        batched product, so the long history gets two gradient terms instead of five. The same
        function as calling the blocks one by one (``tests/unit/models/test_models.py``).
        """
        target, long_mask = e["target"], e["long_mask"]
        keys = {"target_category": e["target_search_key"],
                "history_categories": e["long_search_keys"]}
        if not self._weights_long_history():
            long = e["long"]
            pooled = self.long_attention(target, long, long_mask)
            selection = self.search.selection_mask(target, long, long_mask, **keys)
            return pooled, selection, self.exact_search(target, long, selection)
        # Padded steps zeroed or not (``long_unmasked``): the same values and gradients.
        long = e["long_unmasked"] if "long_unmasked" in e else e["long"]
        fused = long.dtype in fused_dot.DTYPES and model_ops.available()
        # The fused search computes the scores itself (kernels/top_k_mask.cc).
        scores = None if fused else tf.stop_gradient(dot_scores(target, long))
        selection = self.search.selection_mask(target, long, long_mask, scores=scores, **keys)
        valid = tf.cast(long_mask, tf.bool)

        def weights_of(scores):
            return tf.stack([masked_softmax(scores, valid), masked_softmax(scores, selection),
                             tf.cast(selection, scores.dtype)], axis=1)

        if fused:
            # The three reads and their gradient as one op each (kernels/dot_attention.cc).
            masks = tf.stack([valid, selection, selection], axis=1)
            reads, _ = fused_dot.dot_reads(target, long, masks, normalize=[True, True, False])
        else:
            reads = weighted_reads(long, target, weights_of)
        pooled, attended, total = tf.unstack(reads, axis=1)
        plus_one = self.exact_search.mean_denominator == "count_plus_one"
        mean = mean_of_sum(total, selection, plus_one)
        return pooled, selection, tf.concat([attended, mean], axis=-1)

    def loss_terms(self, inputs, labels, training=False) -> dict:
        """The prediction ``logit`` [batch, 1] and the loss as the reference logs it:
        ``classification_loss`` = 0.5 * (BCE(stage one) + BCE(stage two)) and
        ``auxiliary_loss``; labels [batch] in {0, 1}."""
        out = self.forward(inputs, training=training)
        e = out["embedded"]
        classification = 0.5 * (logit_cross_entropy(labels, out["stage_one"])
                                + logit_cross_entropy(labels, out["stage_two"]))
        auxiliary = self.auxiliary(out["states"], e["short"], e["short_negative"],
                                   e["short_mask"], training=training)
        return {"logit": out["stage_two"], "classification_loss": classification,
                "auxiliary_loss": auxiliary}

    def call(self, inputs, targets=None, training=False, testing=False):
        labels = labels_from(targets)
        auxiliary = labels is not None and (training or testing)
        out = self.forward(inputs, training=training, auxiliary=auxiliary)
        if auxiliary:
            e = out["embedded"]
            self.add_loss(0.5 * logit_cross_entropy(labels, out["stage_one"]))
            self.add_loss(self.auxiliary(out["states"], e["short"], e["short_negative"],
                                         e["short_mask"], training=training))
        return out["stage_two"]

    def get_config(self):
        config = super().get_config()
        config.update(
            embedding_dim=self.embedding_dim, short_length=self.short_length, top_k=self.top_k,
            search_mode=self.search_mode, search_feature=self.search_feature,
            esu_attention=self.esu_attention, esu_heads=self.esu_heads,
            stage_one_mlp_dims=list(self.stage_one_mlp_dims),
            stage_two_mlp_dims=list(self.stage_two_mlp_dims),
            aux_mlp_dims=list(self.aux_mlp_dims), gru_units=self.gru_units,
            dropout_rate=self.dropout_rate, reference_compatible=self.reference_compatible,
        )
        return self._config_with_schema(config)


def binary_output(schema: Schema, scale: float = 1.0) -> mm.BinaryOutput:
    """Merlin output for our logit: sigmoid, and ``scale`` x binary cross-entropy."""
    label = schema.select_by_tag(Tags.TARGET).column_names
    if len(label) != 1:
        raise ValueError(f"the schema needs exactly one column tagged 'target', got {label}")
    return mm.BinaryOutput(
        label[0],
        to_call=tf.keras.layers.Activation("sigmoid", dtype="float32", name="probability"),
        default_loss=ScaledBinaryCrossentropy(scale),
    )


def SIMModel(schema: Schema, **kwargs) -> mm.Model:
    """A Merlin ``Model`` of SIM over ``schema`` (see :class:`SIMBlock` for the options)."""
    return mm.Model(SIMBlock(schema, **kwargs), binary_output(schema, scale=0.5))
