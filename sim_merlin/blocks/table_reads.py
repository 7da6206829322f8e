"""Embedding tables that announce the rows they are about to read.

Dense Adam moves every row of an embedding table at every step, the rows a batch did not touch
too. :class:`sim_merlin.training.optimizers.Adam`, driven by a
:class:`~sim_merlin.training.trainer.Trainer`, makes the same updates without a pass over the
whole table: a row's zero-gradient steps wait until the row is read. That is only right if every
read of the table is announced first. :class:`AnnouncedEmbedding` is a Keras ``Embedding`` that
does so: before each lookup it hands its table variable and the list of ids to the callbacks
active in :func:`listening`, and it marks its table so an optimizer knows
(:func:`reads_announced`). A layer making several lookups of one table may announce them all at
once (:meth:`AnnouncedEmbedding.announce`, then ``call(ids, announced=True)``): one catch-up
instead of several. A table read any other way is never deferred.

Example::

    >>> import sim_merlin.tf_compat  # noqa: F401
    >>> import tensorflow as tf
    >>> table = AnnouncedEmbedding(10, 4)
    >>> heard = []
    >>> with listening(lambda variable, ids: heard.append(ids[0].shape.as_list())):
    ...     _ = table(tf.constant([[1, 2, 3]]))
    >>> heard, reads_announced(table.embeddings)
    ([[1, 3]], True)
"""
from __future__ import annotations

import contextlib
import threading

import sim_merlin.tf_compat  # noqa: F401
import tensorflow as tf

_state = threading.local()
_MARK = "_sim_merlin_reads_announced"


def _underlying(variable):
    return getattr(variable, "_variable", variable)


def reads_announced(variable) -> bool:
    """True when every read of ``variable`` goes through :class:`AnnouncedEmbedding`."""
    return bool(getattr(_underlying(variable), _MARK, False))


@contextlib.contextmanager
def listening(callback):
    """Within the block (while a function is traced, or eagerly), ``callback(variable, ids)``
    (``ids`` a list of integer tensors) is called before the lookups of an
    :class:`AnnouncedEmbedding`; the ops it adds run before the lookups."""
    previous = getattr(_state, "callbacks", ())
    _state.callbacks = previous + (callback,)
    try:
        yield
    finally:
        _state.callbacks = previous


@tf.keras.utils.register_keras_serializable(package="sim_merlin")
class AnnouncedEmbedding(tf.keras.layers.Embedding):
    """``tf.keras.layers.Embedding`` whose lookups are announced (see the module docstring)."""

    def build(self, input_shape=None):
        super().build(input_shape)
        setattr(_underlying(self.embeddings), _MARK, True)

    def announce(self, ids: list) -> None:
        """Announce the lookups of every tensor in ``ids`` (each then called with
        ``announced=True``)."""
        if not self.built:  # no table yet, so none any optimizer could defer
            return
        for callback in getattr(_state, "callbacks", ()):
            callback(self.embeddings, list(ids))

    def call(self, inputs, announced: bool = False):
        if not announced:
            self.announce([inputs])
        return super().call(inputs)
