"""When a model's graph may hold the fused ops (the recurrences, the sigmoid MLPs).

:func:`available` is true when the library is built and loaded and nothing rules the ops out:
not on a GPU (they are CPU kernels), not inside ``tf.saved_model.save`` (exported models never
need the library) and not inside :func:`plain_ops` (for functions XLA compiles whole, which cannot
hold custom ops). Otherwise the blocks use their plain TensorFlow paths, which compute the same
values.

Example::

    >>> from sim_merlin.kernels import model_ops
    >>> with model_ops.plain_ops():
    ...     assert not model_ops.available()
"""
from __future__ import annotations

import contextlib
import threading

from sim_merlin.kernels import build

_state = threading.local()


def _in_save_context() -> bool:
    try:
        from tensorflow.python.saved_model import save_context
    except ImportError:  # pragma: no cover - every supported TensorFlow has it
        return False
    return save_context.in_save_context()


@contextlib.contextmanager
def plain_ops():
    """Functions traced inside this block use the blocks' plain TensorFlow paths (e.g. a
    ``tf.function(jit_compile=True)``: XLA cannot compile custom ops)."""
    previous = getattr(_state, "plain", False)
    _state.plain = True
    try:
        yield
    finally:
        _state.plain = previous


def available() -> bool:
    """True when the fused ops can be put into the graph being traced, here and now."""
    return (not getattr(_state, "plain", False) and not _in_save_context() and build.usable())
