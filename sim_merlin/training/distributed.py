"""One process or N Horovod processes behind the same small interface.

:class:`Distributed` lets training code run unchanged on a single process (no Horovod needed, not
even imported) and on N processes started by ``horovodrun`` (Gloo on CPU; NCCL for GPU tensors
when Horovod is built with it). The host-side collectives take and return numpy values and are
meant for eager code: metrics, AUC inputs, step counts, seeds. Gradients are averaged inside the
compiled step with :meth:`Distributed.gradient_tape` or :meth:`Distributed.average_gradients`.

Example (one process)::

    >>> import numpy as np
    >>> from sim_merlin.training.distributed import Distributed
    >>> group = Distributed.create(use_horovod=False)
    >>> group.rank, group.size, group.is_chief, group.enabled
    (0, 1, True, False)
    >>> group.allgather(np.array([0.25, 0.5], dtype=np.float32))
    array([0.25, 0.5 ], dtype=float32)
    >>> group.allreduce_sum(3), group.allreduce_min(7), group.broadcast_object({"seed": 1})
    (3, 7, {'seed': 1})

On N processes (two here, on one machine, Gloo over the loopback interface)::

    horovodrun -np 2 -H localhost:2 --gloo python -m sim_merlin.fit ...

``use_horovod="auto"`` (the default) turns Horovod on only when a launcher started the process:
``HOROVOD_SIZE`` (horovodrun), ``OMPI_COMM_WORLD_SIZE`` (Open MPI) or ``PMI_SIZE`` (MPICH, Slurm)
is set. Launched with more than one process but without an importable ``horovod.tensorflow`` is an
error (N copies of a one-process run would silently repeat each other's work).

Every rank must call the same collectives in the same order with the same dtypes and the same
shape after axis 0; ``allgather`` accepts different lengths, zero included.

Timeouts (Horovod 0.28.1 with Gloo, as measured with ``horovodrun`` on one machine):

* ``HOROVOD_GLOO_TIMEOUT_SECONDS`` (Horovod's default 30; :meth:`Distributed.create` sets
  ``timeout_seconds``, default :data:`DEFAULT_TIMEOUT_SECONDS`, before ``hvd.init()``) bounds each
  Gloo exchange. It fires when a peer *process* stops answering (frozen, unreachable) and at
  start-up when one rank reaches ``hvd.init()`` more than that many seconds after the others (the
  waiting rank aborts with ``Wait timeout ... for key(s)``; SIGABRT, exit code 134). It does *not*
  fire when a live rank is merely late to a collective: Horovod's background threads keep talking,
  so the others wait as long as it takes (a 45 s late allreduce with a 10 s timeout succeeded).
* A rank that never calls a collective while staying alive therefore blocks the others with no
  timeout. Horovod's stall check (``HOROVOD_STALL_CHECK_TIME_SECONDS``, 60;
  ``HOROVOD_STALL_SHUTDOWN_TIME_SECONDS``, 0 = off) is documented for this, but with eager
  collectives it neither warned nor shut down in our runs.
* A rank that exits is detected at once: its peers' pending collectives fail with
  "Horovod has been shut down" (the Gloo connection closes), and horovodrun terminates every
  other rank as soon as one exits non-zero, then exits with status 1.
* GPU tensors reduced with NCCL were not measured here (no GPU): the Gloo timeout covers only
  Gloo's own exchanges; horovodrun's terminate-all still ends the job when a rank exits.
"""
from __future__ import annotations

import os
from typing import Any, Iterable

import numpy as np

#: Environment variables that a launcher sets to the number of processes it started.
LAUNCHER_SIZE_VARIABLES = ("HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
#: Horovod reads its Gloo timeout from here when ``hvd.init()`` runs.
GLOO_TIMEOUT_VARIABLE = "HOROVOD_GLOO_TIMEOUT_SECONDS"
#: Gloo timeout set by :meth:`Distributed.create` when neither the caller nor the environment
#: chose one: long enough for ranks that start a minute apart, short enough to notice a frozen peer.
DEFAULT_TIMEOUT_SECONDS = 120

_NUMBER_KINDS = "iuf"  # numpy dtype kinds the reductions accept
_ARRAY_KINDS = "biuf"  # ... and allgather


def launcher_size(environ=None) -> int | None:
    """The number of processes a launcher (horovodrun, mpirun, srun) started, or ``None`` when
    this process was not started by one."""
    environ = os.environ if environ is None else environ
    for name in LAUNCHER_SIZE_VARIABLES:
        if environ.get(name):
            return int(environ[name])
    return None


def import_horovod():
    """``horovod.tensorflow``, or an ImportError that says what is missing."""
    try:
        import horovod.tensorflow as hvd
    except Exception as error:  # ImportError, or a TensorFlow op-library load error
        raise ImportError(
            "Horovod is needed for multi-process training but `import horovod.tensorflow` failed "
            f"({type(error).__name__}: {error}). Install Horovod built for this TensorFlow with "
            "Gloo (scripts/build_horovod.py, or HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 "
            "pip install --no-cache-dir horovod), or run on one process."
        ) from error
    return hvd


class Distributed:
    """Rank, size and collectives of the process group; one process when ``horovod`` is None.

    Build it with :meth:`create`. ``enabled`` is True when Horovod is active (even with one
    process); ``is_chief`` is rank 0, the process that logs and writes files.
    """

    def __init__(self, horovod=None):
        self._hvd = horovod
        self.enabled = horovod is not None
        self.rank = horovod.rank() if horovod else 0
        self.size = horovod.size() if horovod else 1
        self.local_rank = horovod.local_rank() if horovod else 0
        self.local_size = horovod.local_size() if horovod else 1
        self.is_chief = self.rank == 0

    @classmethod
    def create(cls, use_horovod: str | bool = "auto", timeout_seconds: int | None = None,
               pin_gpu: bool = True) -> "Distributed":
        """The process group for this process.

        ``use_horovod``: ``"auto"`` uses Horovod when a launcher started the process (see
        :func:`launcher_size`), ``True`` insists on it (an ImportError naming what is missing if
        it cannot be imported), ``False`` never imports it.

        ``timeout_seconds``: Gloo timeout written to ``HOROVOD_GLOO_TIMEOUT_SECONDS`` before
        ``hvd.init()``; ``None`` keeps a value already in the environment (horovodrun
        ``--gloo-timeout-seconds`` puts it there) and otherwise uses
        :data:`DEFAULT_TIMEOUT_SECONDS`. It has no effect if Horovod was initialised already.

        ``pin_gpu``: with several visible GPUs, make only GPU ``local_rank`` visible to
        TensorFlow (must happen before TensorFlow touches the GPUs).
        """
        if use_horovod not in ("auto", True, False):
            raise ValueError(f"use_horovod must be 'auto', True or False, got {use_horovod!r}")
        if use_horovod is False:
            return cls()
        launched_size = launcher_size()
        if use_horovod == "auto" and launched_size is None:
            return cls()
        try:
            hvd = import_horovod()
        except ImportError:
            if use_horovod == "auto" and launched_size == 1:
                return cls()
            raise
        if timeout_seconds is not None:
            os.environ[GLOO_TIMEOUT_VARIABLE] = str(int(timeout_seconds))
        else:
            os.environ.setdefault(GLOO_TIMEOUT_VARIABLE, str(DEFAULT_TIMEOUT_SECONDS))
        if not hvd.is_initialized():
            hvd.init()
        if pin_gpu:
            _pin_gpu(hvd.local_rank())
        return cls(hvd)

    def __repr__(self) -> str:
        return (f"Distributed(rank={self.rank}, size={self.size}, local_rank={self.local_rank}, "
                f"enabled={self.enabled})")

    # -- host-side collectives: numpy in, numpy out, eager only -------------------------------

    def allreduce_sum(self, value):
        """Sum over ranks. A Python int/float gives a Python int/float; a numpy scalar or array
        gives the same dtype and shape."""
        return self._allreduce(value, "Sum")

    def allreduce_min(self, value):
        """Minimum over ranks (e.g. the number of steps every rank can take)."""
        return self._allreduce(value, "Min")

    def allreduce_max(self, value):
        """Maximum over ranks."""
        return self._allreduce(value, "Max")

    def allgather(self, array) -> np.ndarray:
        """Every rank's ``array`` concatenated along axis 0 in rank order, on every rank.

        Ranks may contribute different lengths, zero included; dtype and trailing shape must
        agree. The dtype is kept (float32 scores stay float32, int64 labels int64).
        """
        array = np.asarray(array)
        if array.ndim == 0:
            raise ValueError("allgather needs an array with at least one dimension")
        _check_kind(array, _ARRAY_KINDS, "allgather")
        if not self.enabled:
            return array.copy()
        tf = _tensorflow()
        with tf.device("/cpu:0"):
            gathered = self._hvd.allgather(tf.constant(array))
        return gathered.numpy()

    def broadcast_object(self, obj: Any, root_rank: int = 0) -> Any:
        """``obj`` from ``root_rank`` (pickled) on every rank: a seed, a run id, a config."""
        if not self.enabled:
            return obj
        return self._hvd.broadcast_object(obj, root_rank=root_rank)

    def barrier(self) -> None:
        """Return once every rank has called ``barrier``."""
        if self.enabled:
            self.allreduce_sum(np.zeros([1], np.int32))

    # -- variables and gradients ---------------------------------------------------------------

    def broadcast_variables(self, variables: Iterable, root_rank: int = 0) -> None:
        """Assign ``root_rank``'s values to these ``tf.Variable``s on every rank (the model's
        and the optimizer's: build the optimizer's slots first)."""
        if self.enabled:
            self._hvd.broadcast_variables(list(variables), root_rank=root_rank)

    def gradient_tape(self, tape, sparse_as_dense: bool = False):
        """``hvd.DistributedGradientTape(tape)`` when Horovod is active, else ``tape`` itself.

        Its ``gradient()`` averages over ranks. ``IndexedSlices`` gradients (embedding lookups)
        stay ``IndexedSlices``: Horovod allgathers indices and values (divided by the size), so
        the result holds every rank's rows, duplicates included. ``sparse_as_dense=True``
        converts them to dense tensors and allreduces those instead.
        """
        if not self.enabled:
            return tape
        return self._hvd.DistributedGradientTape(tape, sparse_as_dense=sparse_as_dense)

    def average_gradients(self, gradients, sparse_as_dense: bool = False) -> list:
        """Average a list of gradients over ranks (inside or outside ``tf.function``); ``None``
        entries stay ``None``, ``IndexedSlices`` are treated as in :meth:`gradient_tape`.
        ``sparse_as_dense`` converts ``IndexedSlices`` to dense also on one process."""
        tf = _tensorflow()
        averaged = []
        for gradient in gradients:
            if sparse_as_dense and isinstance(gradient, tf.IndexedSlices):
                gradient = tf.convert_to_tensor(gradient)
            if self.enabled and gradient is not None:
                gradient = self._hvd.allreduce(gradient, op=self._hvd.Average)
            averaged.append(gradient)
        return averaged

    # ------------------------------------------------------------------------------------------

    def _allreduce(self, value, op_name: str):
        array = np.asarray(value)
        _check_kind(array, _NUMBER_KINDS, f"allreduce_{op_name.lower()}")
        if self.enabled:
            tf = _tensorflow()
            with tf.device("/cpu:0"):
                reduced = self._hvd.allreduce(tf.constant(array), op=getattr(self._hvd, op_name))
            result = reduced.numpy().astype(array.dtype, copy=False)
        else:
            result = array.copy()
        if isinstance(value, np.generic):  # before float: np.float64 is a float subclass
            return result[()]
        if isinstance(value, (int, float)):  # Python number in, Python number out
            return type(value)(result)
        return result


def _check_kind(array: np.ndarray, kinds: str, operation: str) -> None:
    if array.dtype.kind not in kinds:
        raise TypeError(f"{operation} takes numeric arrays, got dtype {array.dtype}")


def _tensorflow():
    import sim_merlin.tf_compat  # noqa: F401  (Keras 2 before TensorFlow loads)
    import tensorflow as tf

    return tf


def _pin_gpu(local_rank: int) -> None:
    tf = _tensorflow()
    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) <= 1:
        return  # no GPU, or the launcher already gave each rank its own (CUDA_VISIBLE_DEVICES)
    if local_rank >= len(gpus):
        raise ValueError(f"local rank {local_rank} has no GPU: only {len(gpus)} are visible")
    tf.config.set_visible_devices(gpus[local_rank], "GPU")
