"""DIEN's interest extractor, interest evolution (AUGRU) and auxiliary loss.

DIEN (Zhou et al., 2019): a GRU over the behaviour sequence extracts interest states
(``InterestExtractor``); an attention-gated GRU (AUGRU) evolves them towards the target
(``InterestEvolution``); an auxiliary loss teaches each state to predict the next behaviour against
a sampled one (``AuxiliaryLoss``).

Both recurrent layers run as a loop unrolled over the (static) sequence length, with the input
projections of all steps done in one matrix product before the loop; only the products with the
state remain inside it. The arithmetic is that of Keras's ``GRU`` (``reset_after=True``) and of
``keras.layers.RNN(AUGRUCell)``, whose weights they keep, with fewer and larger matrix products
than Keras's ``while`` loop and no loop bookkeeping (tests compare values and gradients). Where
the fused C++ kernels are available (:mod:`sim_merlin.kernels.recurrent`) the state recurrence
after the input projection is one op, forward and backward, with the same arithmetic. A
sequence whose length is unknown when the model is traced falls back to Keras's loop.

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
from sim_merlin.blocks.prelu import PReLU
from sim_merlin.blocks.sequence import dense_sequence
from sim_merlin.kernels import model_ops, recurrent as fused_kernels, sigmoid_mlp as fused_mlp


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

    def build(self, input_shape):
        features = int(input_shape[-1]) - 1  # the last column is the attention score
        self.gates.build([None, features + self.units])
        self.candidate.build([None, features + self.units])
        super().build(input_shape)

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


def _steps(sequence: tf.Tensor) -> int:
    length = sequence.shape[1]
    if length is None:
        raise ValueError("an unrolled recurrence needs a sequence length known at trace time")
    return int(length)


def _dense_apply(x: tf.Tensor, kernel: tf.Tensor, bias=None) -> tf.Tensor:
    """``x @ kernel (+ bias)`` over the last axis of an [..., in] tensor as one 2-D product
    (every step of a sequence at once)."""
    flat = tf.matmul(tf.reshape(x, [-1, x.shape[-1]]), kernel)
    if bias is not None:
        flat = tf.nn.bias_add(flat, bias)
    return tf.reshape(flat, tf.concat([tf.shape(x)[:-1], [kernel.shape[-1]]], axis=0))


def _use_fused(fused) -> bool:
    if fused is None:
        return model_ops.available()
    if fused and not model_ops.available():
        raise RuntimeError("the fused recurrent kernels are not available here")
    return bool(fused)


def _step_mask(mask, sequence):
    if mask is None:
        return tf.ones(tf.shape(sequence)[:2], tf.float32)
    return tf.cast(mask, tf.float32)


def unrolled_gru(sequence, mask, kernel, recurrent_kernel, bias, fused=None,
                 keep_activations=False):
    """Keras ``GRU(return_sequences=True, reset_after=True)`` over [B, T, F] -> [B, T, units].

    ``kernel`` [F, 3u], ``recurrent_kernel`` [u, 3u], ``bias`` [2, 3u] in Keras's layout (gates
    z, r, h); ``mask`` [B, T] bool or None: a masked step keeps the previous state (and output).
    ``fused``: run the recurrence as one C++ op (``sim_merlin.kernels``; ``None``: when
    available) or as TensorFlow ops unrolled over the steps (``False``). ``keep_activations``:
    the fused op keeps its gates for its gradient instead of the gradient recomputing them (for
    training steps; the same values).
    """
    dtype = sequence.dtype
    if _use_fused(fused):
        input_bias, recurrent_bias = tf.unstack(bias)
        return fused_kernels.gru(sequence, kernel, input_bias, recurrent_kernel, recurrent_bias,
                                 _step_mask(mask, sequence), keep_activations=keep_activations)
    kernel, recurrent_kernel, bias = (tf.cast(w, dtype) for w in (kernel, recurrent_kernel, bias))
    input_bias, recurrent_bias = tf.unstack(bias)
    projected = tf.unstack(_dense_apply(sequence, kernel, input_bias), axis=1)
    masks = tf.unstack(tf.expand_dims(mask, -1), axis=1) if mask is not None else None
    state = tf.zeros([tf.shape(sequence)[0], recurrent_kernel.shape[0]], dtype)
    outputs = []
    for t in range(_steps(sequence)):
        x_z, x_r, x_h = tf.split(projected[t], 3, axis=-1)
        inner = tf.nn.bias_add(tf.matmul(state, recurrent_kernel), recurrent_bias)
        h_z, h_r, h_h = tf.split(inner, 3, axis=-1)
        update = tf.sigmoid(x_z + h_z)
        reset = tf.sigmoid(x_r + h_r)
        candidate = tf.tanh(x_h + reset * h_h)
        new_state = update * state + (1.0 - update) * candidate
        state = new_state if masks is None else tf.where(masks[t], new_state, state)
        outputs.append(state)
    return tf.stack(outputs, axis=1)


def unrolled_augru(sequence, scores, mask, cell: AUGRUCell, fused=None,
                   keep_activations=False):
    """``keras.layers.RNN(cell)`` over ``[sequence | scores]``: the final state [B, units].

    ``sequence`` [B, T, F], ``scores`` [B, T], ``mask`` [B, T] bool or None; ``fused`` as for
    :func:`unrolled_gru`. ``keep_activations``: the fused op keeps what its gradient needs
    instead of the gradient running the forward pass again (for training steps; the same
    values).
    """
    dtype = sequence.dtype
    features = sequence.shape[-1]
    if not cell.built:
        with tf.init_scope():
            cell.build([None, features + 1])
    bias = tf.concat([cell.gates.bias, cell.candidate.bias], axis=0)
    if _use_fused(fused):  # float32 weights: the kernel rounds them for its bfloat16 products
        (gate_x, gate_s), (cand_x, cand_s) = (tf.split(w.kernel, [features, cell.units], axis=0)
                                              for w in (cell.gates, cell.candidate))
        return fused_kernels.augru(sequence, tf.concat([gate_x, cand_x], axis=1), bias, gate_s,
                                   cand_s, scores, _step_mask(mask, sequence),
                                   keep_activations=keep_activations)
    gate_x, gate_s = tf.split(tf.cast(cell.gates.kernel, dtype), [features, cell.units], axis=0)
    cand_x, cand_s = tf.split(tf.cast(cell.candidate.kernel, dtype), [features, cell.units],
                              axis=0)
    projected = _dense_apply(sequence, tf.concat([gate_x, cand_x], axis=1), tf.cast(bias, dtype))
    projected = tf.unstack(projected, axis=1)
    scores = tf.unstack(tf.expand_dims(tf.cast(scores, dtype), -1), axis=1)
    masks = tf.unstack(tf.expand_dims(mask, -1), axis=1) if mask is not None else None
    state = tf.zeros([tf.shape(sequence)[0], cell.units], dtype)
    for t in range(_steps(sequence)):
        x_gates, x_candidate = tf.split(projected[t], [2 * cell.units, cell.units], axis=-1)
        reset, update = tf.split(tf.sigmoid(x_gates + tf.matmul(state, gate_s)), 2, axis=-1)
        candidate = tf.tanh(x_candidate + tf.matmul(reset * state, cand_s))
        update = (1.0 - scores[t]) * update
        new_state = update * state + (1.0 - update) * candidate
        state = new_state if masks is None else tf.where(masks[t], new_state, state)
    return state


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
        if sequence.shape[1] is None:  # length unknown when traced: Keras's loop, same weights
            return self.gru(sequence, mask=mask if self.use_mask else None, training=training)
        if not self.gru.built:
            with tf.init_scope():  # variables are created outside any tf.function
                self.gru.build(tf.TensorShape(sequence.shape))
        cell = self.gru.cell
        keep = training is True and fused_kernels.training_keeps_activations()
        return unrolled_gru(sequence, tf.cast(mask, tf.bool) if self.use_mask else None,
                            cell.kernel, cell.recurrent_kernel, cell.bias, keep_activations=keep)

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
             PReLU(alpha_initializer=tf.keras.initializers.Constant(0.1))],
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
        if states.shape[1] is None:  # length unknown when traced: Keras's loop, same weights
            steps = tf.concat([states, tf.expand_dims(tf.cast(weights, states.dtype), -1)], -1)
            final = self.augru(steps, mask=mask if self.use_mask else None, training=training)
            return (final, weights) if return_weights else final
        if not self.augru.built:
            shape = tf.TensorShape(states.shape)
            with tf.init_scope():
                self.augru.build(shape[:-1].concatenate([shape[-1] + 1]))
        keep = training is True and fused_kernels.training_keeps_activations()
        final = unrolled_augru(states, weights, tf.cast(mask, tf.bool) if self.use_mask else None,
                               self.augru.cell, keep_activations=keep)
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
    averaged over the pairs whose two steps are both real behaviours. In a training call
    (``training=True``) with the fused kernels the tower and the loss run as one op that also
    computes their gradients (``sim_merlin.kernels.sigmoid_mlp.sigmoid_mlp_logistic_loss``).
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

    def _pairs(self, states, positive, negative, whole_states=False):
        """The scorer's inputs: the states of steps 0..T-2 [batch, length - 1, units] (all the
        states with ``whole_states``), the behaviours of steps 1..T-1 ``later`` (positive,
        negative), the first layer's kernel split into its state and behaviour rows."""
        # tf.split, not states[:, :-1] / behaviours[:, 1:]: the gradient of a strided slice is
        # slow on CPU (StridedSliceGrad), that of a split is a concatenation.
        length = tf.shape(states)[1]
        earlier = states
        if not whole_states:
            earlier, _ = tf.split(states, tf.stack([length - 1, 1]), axis=1, num=2)
        later = [tf.split(tf.cast(b, states.dtype), tf.stack([1, length - 1]), axis=1, num=2)[1]
                 for b in (positive, negative)]
        first = self.scorer_layers[0]
        state_dim = states.shape[-1]
        if not first.built:
            with tf.init_scope():
                first.build(tf.TensorShape([None, state_dim + later[0].shape[-1]]))
        w_state, w_behaviour = tf.split(first.kernel, [state_dim, -1], axis=0)
        return earlier, later, w_state, w_behaviour

    def _fused(self) -> bool:
        return self.dropout is None and model_ops.available()

    def _fused_arguments(self, states, positive, negative, whole_states=False):
        """The whole tower as one op (sim_merlin.kernels.sigmoid_mlp), same function: its rows
        are each step's (positive, negative) pair, the state a group input they share.
        ``whole_states``: the groups are all the states, [batch * length, units] (for the loss
        op's ``group_steps``), not a copy without each sample's last step."""
        earlier, later, w_state, w_behaviour = self._pairs(states, positive, negative,
                                                           whole_states)
        pairs = tf.stack(later, axis=2)  # [batch, length - 1, 2, dim]
        first = self.scorer_layers[0]
        kernels, biases = fused_mlp.keras_weights(self.scorer_layers[1:], first.units)
        arguments = dict(inputs=tf.reshape(pairs, [-1, pairs.shape[-1]]),
                         kernels=[w_behaviour, *kernels], biases=[first.bias, *biases],
                         groups=tf.reshape(earlier, [-1, earlier.shape[-1]]),
                         group_kernel=w_state)
        return pairs, arguments

    def logits(self, states, positive, negative, training=False):
        """[batch, length - 1] scores of (state_t, positive_{t+1}) and of (state_t,
        negative_{t+1}). The first layer's product with the state, shared by the two pairs, is
        computed once: ``[s, b] W = s W_s + b W_b``."""
        if self._fused():
            pairs, arguments = self._fused_arguments(states, positive, negative)
            logits = fused_mlp.sigmoid_mlp(**arguments)
            click, no_click = tf.unstack(tf.reshape(logits, tf.shape(pairs)[:-1]), axis=-1)
            return click, no_click
        earlier, later, w_state, w_behaviour = self._pairs(states, positive, negative)
        first, *hidden_layers = self.scorer_layers[:-1]
        shared = _dense_apply(earlier, tf.cast(w_state, states.dtype),
                              tf.cast(first.bias, states.dtype))  # [batch, length - 1, units]
        behaviours = tf.stack(later)  # [2, batch, length - 1, dim]: one product for both
        pre = tf.expand_dims(shared, 0) + _dense_apply(behaviours,
                                                       tf.cast(w_behaviour, states.dtype))
        shape = tf.shape(pre)[:-1]
        pre = tf.reshape(pre, [-1, pre.shape[-1]])  # 2-D: product, bias, activation fuse (oneDNN)
        x = first.activation(pre)
        for layer in hidden_layers:
            x = layer(x)
        if self.dropout is not None:
            x = self.dropout(x, training=training)
        logits = self.scorer_layers[-1](x)
        click, no_click = tf.unstack(tf.reshape(logits, shape))
        return click, no_click

    def call(self, states, positive=None, negative=None, mask=None, training=False):
        if isinstance(states, (list, tuple)):
            states, positive, negative, mask = states
        mask = tf.cast(mask, tf.float32)
        if training is True and self._fused():  # a training step: its gradient is taken
            return self._fused_loss(states, positive, negative, mask)
        click, no_click = (tf.cast(z, tf.float32)
                           for z in self.logits(states, positive, negative, training))
        if self.reference_compatible:
            p_click = tf.sigmoid(click) + 1e-6
            p_no_click = tf.sigmoid(no_click) + 1e-6
            per_pair = -tf.math.log(p_click) - tf.math.log(1.0 - p_no_click)
            return tf.reduce_mean(per_pair * mask[:, 1:])
        valid = mask[:, :-1] * mask[:, 1:]
        # -log sigmoid(z) = softplus(-z); -log(1 - sigmoid(z)) = softplus(z): exact, no NaN.
        per_pair = tf.nn.softplus(-click) + tf.nn.softplus(no_click)
        return tf.math.divide_no_nan(tf.reduce_sum(per_pair * valid), tf.reduce_sum(valid))

    def _fused_loss(self, states, positive, negative, mask):
        """In training, the loss and its gradients as one op
        (``sigmoid_mlp_logistic_loss``): the tower runs once per step, not forward and again in
        its gradient. The same loss as :meth:`call`'s other path, up to float32 rounding."""
        steps = states.shape[1]  # the groups are the states themselves when it is known
        whole = steps is not None and steps > 1
        _, arguments = self._fused_arguments(states, positive, negative, whole_states=whole)
        if self.reference_compatible:  # the mean over all pairs of the later step's mask
            per_pair = mask[:, 1:] / tf.cast(tf.size(mask[:, 1:]), tf.float32)
        else:  # the mean over the pairs whose two steps are real
            valid = mask[:, :-1] * mask[:, 1:]
            per_pair = tf.math.divide_no_nan(valid, tf.reduce_sum(valid))
        weights = tf.stack([per_pair, per_pair], axis=-1)  # rows: (positive, negative) pairs
        labels = tf.stack([tf.ones_like(per_pair), tf.zeros_like(per_pair)], axis=-1)
        return fused_mlp.sigmoid_mlp_logistic_loss(
            labels=labels, weights=weights, epsilon=1e-6 if self.reference_compatible else 0.0,
            group_steps=int(steps) if whole else 0, **arguments)

    def get_config(self):
        config = super().get_config()
        config.update(hidden_units=list(self.hidden_units), dropout_rate=self.dropout_rate,
                      reference_compatible=self.reference_compatible)
        return config
