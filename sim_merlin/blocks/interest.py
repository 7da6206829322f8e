"""DIEN's interest extractor, interest evolution (AUGRU) and auxiliary loss.

DIEN (Zhou et al., 2019): a GRU over the behaviour sequence extracts interest states
(``InterestExtractor``); an attention-gated GRU (AUGRU) evolves them towards the target
(``InterestEvolution``); an auxiliary loss teaches each state to predict the next behaviour against
a sampled one (``AuxiliaryLoss``).

Unlike the reference, padded steps do not change the recurrent state (Keras masking), and the
auxiliary loss is averaged over valid positions only. ``reference_compatible=True`` restores the
reference's choices (padding processed as ordinary steps; loss averaged over batch x (length - 1),
probabilities offset by 1e-6, the positive mask used for both terms).

Example::

    >>> import sim_merlin.tf_compat  # noqa: F401
    >>> import tensorflow as tf
    >>> extractor = InterestExtractor(units=6)
    >>> states = extractor(tf.ones([2, 5, 4]), tf.constant([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]))
    >>> states.shape.as_list()
    [2, 5, 6]
"""
from __future__ import annotations

import sim_merlin.tf_compat  # noqa: F401
import merlin.models.tf as mm
import tensorflow as tf

from sim_merlin.blocks.attention import TargetAttention
from sim_merlin.blocks.sequence import dense_sequence


@tf.keras.utils.register_keras_serializable(package="sim_merlin")
class AUGRUCell(tf.keras.layers.Layer):
    """GRU cell whose update gate is scaled by an attention score (DIEN's AUGRU).

    Input per step: ``[x_t | a_t]`` (the behaviour state and its attention score, last column).

    ``[r, u] = sigmoid(W_g [x_t | s] + b_g)`` (b_g initialised to 1),
    ``c = tanh(W_c [x_t | r * s] + b_c)``, ``u' = (1 - a_t) * u``,
    ``s_new = u' * s + (1 - u') * c``: with ``a_t = 1`` the state moves fully to ``c``, with
    ``a_t = 0`` the cell is a plain GRU step (the convention of DIEN's code and the reference).
    """

    def __init__(self, units: int, **kwargs):
        super().__init__(**kwargs)
        self.units = int(units)
        self.state_size = self.units
        self.output_size = self.units
        self.gates = tf.keras.layers.Dense(
            2 * self.units, activation="sigmoid", bias_initializer="ones", name="gates"
        )
        self.candidate = tf.keras.layers.Dense(self.units, activation="tanh", name="candidate")

    def call(self, inputs, states):
        state = states[0] if isinstance(states, (list, tuple)) else states
        x, score = tf.split(inputs, [-1, 1], axis=-1)  # not [:, :-1]: slow gradient on CPU
        reset, update = tf.split(self.gates(tf.concat([x, state], axis=-1)), 2, axis=-1)
        candidate = self.candidate(tf.concat([x, reset * state], axis=-1))
        update = (1.0 - score) * update
        new_state = update * state + (1.0 - update) * candidate
        return new_state, [new_state]

    def get_config(self):
        config = super().get_config()
        config.update(units=self.units)
        return config


@tf.keras.utils.register_keras_serializable(package="sim_merlin")
class InterestExtractor(mm.Block):
    """GRU over a behaviour sequence [batch, length, dim] -> interest states [batch, length, units].

    With ``use_mask=True`` padded steps (mask 0) keep the previous state (zeros before the first
    behaviour); ``use_mask=False`` runs them as ordinary steps, as the reference does.
    """

    def __init__(self, units: int, use_mask: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.units = int(units)
        self.use_mask = bool(use_mask)
        self.gru = tf.keras.layers.GRU(self.units, return_sequences=True, name="gru")

    def call(self, sequence, mask=None, training=False):
        if isinstance(sequence, (list, tuple)):
            sequence, mask = sequence
        sequence, mask = dense_sequence(sequence, mask)
        return self.gru(sequence, mask=mask if self.use_mask else None, training=training)

    def get_config(self):
        config = super().get_config()
        config.update(units=self.units, use_mask=self.use_mask)
        return config


@tf.keras.utils.register_keras_serializable(package="sim_merlin")
class InterestEvolution(mm.Block):
    """Attention of the target over interest states, then an AUGRU to the final interest.

    The target [batch, dim] is projected to the state width (Dense + PReLU, alpha 0.1), scored
    against each state with DIN's activation unit (``attention_units``, sigmoid), the scores
    softmax-normalised over valid steps; the AUGRU returns the last state [batch, units].
    """

    def __init__(self, units: int, attention_units=(80, 40), use_mask: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.units = int(units)
        self.attention_units = tuple(int(u) for u in attention_units)
        self.use_mask = bool(use_mask)
        self.query_projection = tf.keras.Sequential(
            [tf.keras.layers.Dense(self.units),
             tf.keras.layers.PReLU(alpha_initializer=tf.keras.initializers.Constant(0.1))],
            name="query_projection",
        )
        self.attention = TargetAttention(
            "din", normalize=True, hidden_units=self.attention_units, activation="sigmoid"
        )
        self.augru = tf.keras.layers.RNN(AUGRUCell(self.units), name="augru")

    def call(self, query, states=None, mask=None, return_weights=False, training=False):
        if isinstance(query, (list, tuple)):
            query, states, mask = query
        states, mask = dense_sequence(states, mask)
        projected = self.query_projection(query)
        _, weights = self.attention(projected, states, mask, return_weights=True)
        steps = tf.concat([states, tf.expand_dims(tf.cast(weights, states.dtype), -1)], axis=-1)
        final = self.augru(steps, mask=mask if self.use_mask else None, training=training)
        return (final, weights) if return_weights else final

    def get_config(self):
        config = super().get_config()
        config.update(units=self.units, attention_units=list(self.attention_units),
                      use_mask=self.use_mask)
        return config


@tf.keras.utils.register_keras_serializable(package="sim_merlin")
class AuxiliaryLoss(mm.Block):
    """DIEN's auxiliary loss: interest state t must tell behaviour t+1 from a sampled one.

    Inputs: ``states`` [batch, length, units], ``positive`` / ``negative`` behaviour embeddings
    [batch, length, dim] (the history and the negative history), ``mask`` [batch, length].
    A shared MLP (``hidden_units``, sigmoid; the reference's is 100-50) scores
    ``[state_t | behaviour_{t+1}]``; the loss is ``-log sigmoid(z+) - log(1 - sigmoid(z-))``,
    averaged over the pairs whose two steps are both real behaviours.
    """

    def __init__(self, hidden_units=(100, 50), dropout_rate: float = 0.0,
                 reference_compatible: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.hidden_units = tuple(int(u) for u in hidden_units)
        self.dropout_rate = float(dropout_rate)
        self.reference_compatible = bool(reference_compatible)
        # A plain list, not a Sequential: a model used only for inference never calls this MLP,
        # and unbuilt layers must then simply have no weights.
        self.scorer_layers = [
            tf.keras.layers.Dense(u, activation="sigmoid", name=f"auxiliary_{i}")
            for i, u in enumerate(self.hidden_units)
        ]
        self.dropout = tf.keras.layers.Dropout(self.dropout_rate) if self.dropout_rate > 0 else None
        self.scorer_layers.append(tf.keras.layers.Dense(1, dtype="float32", name="auxiliary_logit"))

    def logits(self, states, behaviours, training=False):
        """[batch, length - 1] scores of (state_t, behaviour_{t+1})."""
        # tf.split, not states[:, :-1] / behaviours[:, 1:]: the gradient of a strided slice is
        # slow on CPU (StridedSliceGrad), that of a split is a concatenation.
        length = tf.shape(states)[1]
        earlier, _ = tf.split(states, tf.stack([length - 1, 1]), axis=1, num=2)
        _, later = tf.split(tf.cast(behaviours, states.dtype), tf.stack([1, length - 1]), axis=1,
                            num=2)
        x = tf.concat([earlier, later], axis=-1)
        for layer in self.scorer_layers[:-1]:
            x = layer(x)
        if self.dropout is not None:
            x = self.dropout(x, training=training)
        return tf.squeeze(self.scorer_layers[-1](x), axis=-1)

    def call(self, states, positive=None, negative=None, mask=None, training=False):
        if isinstance(states, (list, tuple)):
            states, positive, negative, mask = states
        mask = tf.cast(mask, tf.float32)
        click = tf.cast(self.logits(states, positive, training), tf.float32)
        no_click = tf.cast(self.logits(states, negative, training), tf.float32)
        if self.reference_compatible:
            p_click = tf.sigmoid(click) + 1e-6
            p_no_click = tf.sigmoid(no_click) + 1e-6
            per_pair = -tf.math.log(p_click) - tf.math.log(1.0 - p_no_click)
            return tf.reduce_mean(per_pair * mask[:, 1:])
        valid = mask[:, :-1] * mask[:, 1:]
        # -log sigmoid(z) = softplus(-z); -log(1 - sigmoid(z)) = softplus(z): exact, no NaN.
        per_pair = tf.nn.softplus(-click) + tf.nn.softplus(no_click)
        return tf.math.divide_no_nan(tf.reduce_sum(per_pair * valid), tf.reduce_sum(valid))

    def get_config(self):
        config = super().get_config()
        config.update(hidden_units=list(self.hidden_units), dropout_rate=self.dropout_rate,
                      reference_compatible=self.reference_compatible)
        return config
