"""The compiled steps of ``python -m sim_merlin.fit``: train, predict, evaluate.

:class:`Trainer` drives a SIM, DIN or DIEN Merlin model through its block's ``loss_terms``
(prediction logit, classification loss, auxiliary loss), so the logged losses are the reference's
``total_loss``, ``classification_loss`` and ``dien_aux_loss``, while the Merlin model itself is
what is saved and exported.

- Mixed precision: the model is built under a ``mixed_float16`` or ``mixed_bfloat16`` policy
  (see :func:`precision_policy`); float16 gets dynamic loss scaling, bfloat16 needs none. Logits
  and losses are float32.
- XLA: ``xla=True`` turns on TensorFlow's XLA auto-clustering for the training step (as the
  reference's ``--xla`` does) and compiles the prediction step whole with ``jit_compile``.
  Compiling the whole training step with ``jit_compile`` works but is slow: an op of the
  backward pass needs its input values at compile time, so XLA recompiles for every batch.
- Horovod: gradients are averaged over workers; embedding gradients stay sparse
  (``IndexedSlices``, exchanged by allgather) unless ``sparse_as_dense``.
- Deferred Adam rows: with :class:`sim_merlin.training.optimizers.Adam` the embedding tables'
  untouched rows get their (zero-gradient) Adam steps when they are next read, not every step
  (dense Adam's values, without a pass over every table per step). The training step brings the
  rows it reads up to date first; :meth:`Trainer.synchronize` brings all rows, and
  :meth:`Trainer.predict_step` / :meth:`Trainer.predict_logits` call it. Call it yourself before
  reading, saving or exporting the model's weights after :meth:`Trainer.train_step`.

Example::

    >>> import sim_merlin.tf_compat  # noqa: F401
    >>> import tensorflow as tf
    >>> from sim_merlin.models.din import DINModel
    >>> from sim_merlin.schema import sample_schema
    >>> schema = sample_schema({"item_id": 30, "category_id": 5}, {"user_id": 9}, 4)
    >>> batch = {"user_id": tf.constant([1, 2]), "item_id": tf.constant([3, 4]),
    ...          "category_id": tf.constant([1, 2]),
    ...          "item_id_history": tf.constant([[0, 5, 6, 7], [1, 2, 3, 4]]),
    ...          "category_id_history": tf.constant([[0, 1, 1, 2], [3, 3, 3, 3]]),
    ...          "item_id_neg_history": tf.constant([[0, 9, 9, 9], [9, 9, 9, 9]]),
    ...          "category_id_neg_history": tf.constant([[0, 4, 4, 4], [4, 4, 4, 4]])}
    >>> model = DINModel(schema, embedding_dim=4, short_length=2)
    >>> trainer = Trainer(model, tf.keras.optimizers.Adam(0.01))
    >>> trainer.build(batch)
    >>> losses = trainer.train_step(batch, tf.constant([1, 0]))
    >>> sorted(losses)
    ['auxiliary_loss', 'classification_loss', 'total_loss']
"""
from __future__ import annotations

import contextlib

import sim_merlin.tf_compat  # noqa: F401
import numpy as np
import tensorflow as tf

from sim_merlin.blocks.table_reads import listening
from sim_merlin.kernels.embedding_rows import bfloat16_gradient_rows
from sim_merlin.kernels.model_ops import plain_ops


def precision_policy(amp: bool, device: str = "cpu", dtype: str = "auto") -> str:
    """The Keras mixed-precision policy for ``--amp``: float32 without it; with it
    ``mixed_float16`` on a GPU and ``mixed_bfloat16`` on a CPU (``dtype`` overrides ``auto``)."""
    if not amp:
        return "float32"
    if dtype == "auto":
        dtype = "float16" if device == "gpu" else "bfloat16"
    if dtype not in ("float16", "bfloat16"):
        raise ValueError(f"--amp_dtype must be auto, float16 or bfloat16, got {dtype!r}")
    return f"mixed_{dtype}"


def row_blocks(features: dict, count: int) -> list[dict]:
    """``features`` (a dict of tensors with the same number of rows) cut into ``count``
    consecutive blocks of rows, as equal as possible (some empty if rows < count)."""
    rows = tf.shape(next(iter(features.values())))[0]
    sizes = tf.fill([count], rows // count) + tf.cast(tf.range(count) < rows % count, tf.int32)
    pieces = {name: tf.split(value, sizes, num=count, axis=0) for name, value in features.items()}
    return [{name: parts[i] for name, parts in pieces.items()} for i in range(count)]


class Trainer:
    """Train, predict and evaluate steps for a SIM, DIN or DIEN Merlin model."""

    def __init__(self, model, optimizer, distributed=None, xla: bool = False,
                 sparse_as_dense: bool = False, inference_shards: int = 1):
        if int(inference_shards) < 1:
            raise ValueError(f"inference_shards must be >= 1, got {inference_shards}")
        self.inference_shards = int(inference_shards)
        self.model = model
        self.block = model.blocks[0]
        if not hasattr(self.block, "loss_terms"):
            raise TypeError(f"{type(self.block).__name__} has no loss_terms(); the trainer "
                            "drives SIM, DIN and DIEN models")
        self.distributed = distributed
        self.xla = bool(xla)
        self.sparse_as_dense = bool(sparse_as_dense)
        # Loss scaling follows the precision the model was built with, not the current default.
        self.loss_scaling = self.block.compute_dtype == "float16"
        if self.loss_scaling:
            optimizer = tf.keras.mixed_precision.LossScaleOptimizer(optimizer)
        self.optimizer = optimizer
        if self.xla:
            # Process-wide, as the reference's --xla: every later tf.function is auto-clustered.
            tf.config.optimizer.set_jit("autoclustering")
        self._gradients = tf.function(self._compute_gradients)
        self._compiled_train_step = tf.function(self._train_step)
        # XLA compiles the prediction step whole, and cannot compile the fused (custom) kernels.
        self._compiled_predict_step = tf.function(
            self._predict_step_plain if self.xla else self._predict_step,
            jit_compile=self.xla or None)
        self.deferred_tables = []  # tables whose untouched rows' Adam steps wait (see build)
        self._rows_pending = False

    @property
    def _base_optimizer(self):
        """The optimizer under a mixed-precision loss-scale wrapper, if any."""
        return getattr(self.optimizer, "inner_optimizer", self.optimizer)

    @property
    def _horovod(self) -> bool:
        return self.distributed is not None and self.distributed.enabled

    def build(self, features) -> None:
        """Create every variable (model and optimizer slots) from one batch of features."""
        self.model(features, training=False)
        labels = tf.zeros([tf.shape(next(iter(features.values())))[0]])
        self.block.loss_terms(features, labels, training=False)  # the auxiliary tower too
        self.optimizer.build(self.model.trainable_variables)
        adam = self._base_optimizer
        if hasattr(adam, "defer_untouched_rows") and not self.sparse_as_dense:
            self.deferred_tables = adam.defer_untouched_rows(self.model.trainable_variables)

    def _catch_up(self, variable, ids):
        self._base_optimizer.catch_up(variable, ids)

    def train_step(self, features, labels) -> dict:
        """One optimizer step on a batch; the losses (float32 scalars)."""
        if self.deferred_tables and not self._rows_pending:
            # Every row is up to date (or was just restored): count from the current step.
            self._base_optimizer.mark_current()
            self._rows_pending = True
        return self._compiled_train_step(features, labels)

    def synchronize(self) -> None:
        """Bring every row of the deferred tables up to date (a no-op when none waits)."""
        if self._rows_pending:
            self._base_optimizer.synchronize()
            self._rows_pending = False

    def predict_step(self, features):
        """Logits (float32 [B]) of a batch of features, from up-to-date weights."""
        self.synchronize()
        return self._compiled_predict_step(features)

    def broadcast(self) -> None:
        """Copy rank 0's model and optimizer variables to every worker."""
        self.synchronize()
        if self._horovod:
            self.distributed.broadcast_variables(self.model.variables + self.optimizer.variables)

    def _compute_gradients(self, features, labels):
        labels = tf.reshape(tf.cast(labels, tf.float32), [-1])
        variables = self.model.trainable_variables
        # The lookups of deferred tables bring their rows up to date first. Their gradient rows
        # may stay bfloat16 (the deferred update widens them, exactly) unless Horovod exchanges
        # them.
        reads = listening(self._catch_up) if self.deferred_tables else contextlib.nullcontext()
        half = (bfloat16_gradient_rows(self.deferred_tables)
                if self.deferred_tables and not self._horovod else contextlib.nullcontext())
        with tf.GradientTape() as tape, reads, half:
            terms = self.block.loss_terms(features, labels, training=True)
            total = terms["classification_loss"] + terms["auxiliary_loss"]
            scaled = self.optimizer.get_scaled_loss(total) if self.loss_scaling else total
        gradients = tape.gradient(scaled, variables)
        losses = {"total_loss": total, "classification_loss": terms["classification_loss"],
                  "auxiliary_loss": terms["auxiliary_loss"]}
        return losses, gradients

    def _train_step(self, features, labels):
        losses, gradients = self._gradients(features, labels)
        if self.loss_scaling:
            gradients = self.optimizer.get_unscaled_gradients(gradients)
        if self._horovod:
            gradients = self.distributed.average_gradients(gradients, self.sparse_as_dense)
        elif self.sparse_as_dense:
            gradients = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g
                         for g in gradients]
        # Sparse gradients go to the optimizer as they are: ours sum duplicate rows in their own
        # update (sim_merlin.training.optimizers).
        self.optimizer.apply_gradients(zip(gradients, self.model.trainable_variables))
        return losses

    def _predict_step(self, features):
        # The model's output is the sigmoid of the block's logit; score with the block directly.
        # With inference_shards = N the rows are scored in N blocks that share no op, so the
        # executor runs them side by side (the model's chain of recurrent steps otherwise
        # leaves cores idle); every row's score is the same.
        shards = [features] if self.inference_shards == 1 else row_blocks(
            features, self.inference_shards)
        return tf.concat([tf.reshape(tf.cast(self.block(shard, training=False), tf.float32), [-1])
                          for shard in shards], axis=0)

    def _predict_step_plain(self, features):
        with plain_ops():
            return self._predict_step(features)

    def predict_logits(self, batches) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits (float32) and labels over ``batches`` of ``(features, labels)``."""
        logits, labels = [], []
        for features, batch_labels in batches:
            logits.append(self.predict_step(features).numpy())
            if batch_labels is not None:
                labels.append(np.asarray(batch_labels).reshape(-1))
        if not logits:
            return np.zeros([0], np.float32), np.zeros([0], np.int64)
        if labels and len(labels) != len(logits):
            raise ValueError(f"{len(labels)} of {len(logits)} batches have labels: either all "
                             "batches carry labels or none does")
        return np.concatenate(logits), (np.concatenate(labels) if labels else None)


def binary_cross_entropy(labels: np.ndarray, logits: np.ndarray) -> float:
    """Mean BCE of ``logits`` against 0/1 ``labels``, in float64 (the sample-weighted loss)."""
    x = np.asarray(logits, np.float64).reshape(-1)
    y = np.asarray(labels, np.float64).reshape(-1)
    if x.size != y.size:
        raise ValueError(f"{y.size} labels for {x.size} logits")
    if x.size == 0:
        return float("nan")
    return float(np.mean(np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))))
