"""SIM, DIN and DIEN as Merlin models (:mod:`.sim`, :mod:`.din`, :mod:`.dien`).

:func:`load_model` reloads a model saved with ``model.save`` or exported by
``python -m sim_merlin.fit --export_dir``: Keras needs this package's classes registered, which
importing the model modules does. Serving through the SavedModel signature needs nothing::

    >>> import tensorflow as tf  # doctest: +SKIP
    >>> tf.saved_model.load("export").signatures["serving_default"]  # doctest: +SKIP
"""
from __future__ import annotations


def load_model(path):
    """``tf.keras.models.load_model(path)`` with SIM's, DIN's and DIEN's classes registered."""
    import sim_merlin.tf_compat  # noqa: F401
    import tensorflow as tf

    from sim_merlin.models import dien, din, sim  # noqa: F401  (register the classes)

    return tf.keras.models.load_model(path)
