"""Training logs in the reference's dllogger format, without the ``dllogger`` package.

The reference (DeepLearningExamples ``TensorFlow2/Recommendation/SIM/main.py::init_logger``) logs on
rank 0 through NVIDIA dllogger (github.com/NVIDIA/dllogger, ``dllogger/logger.py``, version 1.0.0)
with two backends, and this module writes the same lines so existing log parsers keep working:

* ``JSONStreamBackend`` file, one event per line, ``DLLL `` + ``json.dumps`` of a dict whose keys
  come in this order::

      LOG:      timestamp, datetime, elapsedtime, type="LOG", step, data
      METADATA: timestamp, elapsedtime, datetime, type="METADATA", metric, metadata

  (yes, dllogger swaps ``datetime`` and ``elapsedtime`` between the two). ``timestamp`` is
  ``str(now.timestamp())``, ``datetime`` is ``str(now)`` of a naive local ``datetime.now()``,
  ``elapsedtime`` is ``str`` of the seconds since the logger was created, ``step`` is the step
  tuple as a JSON list. ``json.dumps`` keeps its defaults, so NaN is written as ``NaN``.
* ``StdOutBackend`` with the default formats (main.py does not customise them)::

      DLL <str(datetime)> - <str(step tuple)> <metric> : <value> <unit> ...

  where the value is ``("{" + metadata["format"] + "}").format(value)`` when the metric's metadata
  has a ``format`` (``{}`` otherwise, and ``None`` stays ``None``), and the unit is
  ``metadata["unit"]`` or ``""`` when it has none; metrics are joined by one space. So a metric
  without a unit ends in a space, and ``test_auc`` (metadata ``{"unit": None}``) prints
  ``test_auc : 0.8 None`` exactly like the reference.

Deliberate differences from the reference:

* The file is flushed after every METADATA line and every LOG line whose step has fewer than two
  elements (epoch lines ``(epoch,)`` and summaries ``()``) and on ``close()``. dllogger leaves the
  file block-buffered until exit, so a killed run loses its epoch results.
* Values are converted to plain Python numbers before they are written: numpy scalars and
  0-d arrays, TensorFlow tensors (anything with ``.numpy()``, ``.tolist()``, ``.item()`` or
  ``__float__``). dllogger would fail on a ``tf.Tensor`` or an ``np.float32``.
* A step given as a list is printed on stdout as a tuple, like the reference's tuples.

Example::

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "results", "log.json")
    >>> with DLLogger(path, stdout=False) as logger:
    ...     reference_metadata(logger)
    ...     logger.log(step=(0, 1), data={"total_loss": 0.5, "samples/s": 1000.0})
    ...     logger.log(step=(0,), data={"throughput": 2000.0, "test_auc": 0.8})
    >>> events = read_log(path)
    >>> [event["type"] for event in events]
    ['METADATA', 'METADATA', 'METADATA', 'METADATA', 'METADATA', 'LOG', 'LOG']
    >>> list(events[5])
    ['timestamp', 'datetime', 'elapsedtime', 'type', 'step', 'data']
    >>> events[5]["step"], events[5]["data"]
    ([0, 1], {'total_loss': 0.5, 'samples/s': 1000.0})
"""
from __future__ import annotations

import atexit
import json
import os
import sys
from datetime import datetime
from typing import Any, Callable

#: The METADATA lines main.py::init_logger writes right after creating the logger, in order.
REFERENCE_METADATA: tuple[tuple[str, dict], ...] = (
    ("test_auc", {"unit": None}),
    ("latency_p90", {"unit": "ms"}),
    ("train_loss", {"unit": None}),
    ("time_to_train", {"unit": "s"}),
    ("throughput", {"unit": "samples/s"}),
)


def to_json_value(value: Any) -> Any:
    """``value`` with numpy/TensorFlow numbers turned into Python numbers (recursively in dicts,
    lists and tuples); other values are returned unchanged."""
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, dict):
        return {key: to_json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_value(item) for item in value]
    if hasattr(value, "numpy"):  # tf.Tensor, tf.Variable
        return to_json_value(value.numpy())
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    for base in (bool, int, float, str):  # subclasses such as enum.IntEnum
        if isinstance(value, base):
            return base(value)
    if hasattr(value, "__float__"):
        return float(value)
    return value


def _stdout_metric(metric: str, metadata: dict, value: Any) -> str:
    """dllogger's ``default_metric_format``."""
    unit = metadata["unit"] if "unit" in metadata.keys() else ""
    value_format = "{" + metadata["format"] + "}" if "format" in metadata.keys() else "{}"
    shown = value_format.format(value) if value is not None else value
    return "{} : {} {}".format(metric, shown, unit)


def _is_epoch_level(step: Any) -> bool:
    return not (isinstance(step, (tuple, list)) and len(step) >= 2)


class DLLogger:
    """Writes dllogger ``DLLL`` JSON lines to ``json_path`` and ``DLL`` lines to stdout.

    Args:
        json_path: the JSON-lines file (its parent directory is created); ``None`` for none.
        stdout: also print the StdOutBackend lines.
        enabled: ``False`` makes every method a no-op and creates no file (Horovod ranks other
            than 0, as main.py's ``dllogger.init(backends=[])``).
        append: append to an existing file instead of truncating it (dllogger's ``append``).
        now: the clock giving the naive local ``datetime`` of each line (for tests).
    """

    def __init__(self, json_path: str | os.PathLike | None, stdout: bool = True,
                 enabled: bool = True, append: bool = False,
                 now: Callable[[], datetime] = datetime.now):
        self.enabled = enabled
        self.stdout = stdout and enabled
        self._now = now
        self._metadata: dict[str, dict] = {}
        self._file = None
        self._closed = False
        if enabled and json_path is not None:
            json_path = os.fspath(json_path)
            parent = os.path.dirname(json_path)
            if parent:
                os.makedirs(parent, exist_ok=True)
            self._file = open(json_path, "a" if append else "w")
            atexit.register(self.close)
        self.start_time = now()

    def metadata(self, metric: str, metadata: dict) -> None:
        """A METADATA line; ``unit`` and ``format`` also shape later stdout lines of ``metric``."""
        if not self.enabled:
            return
        self._check_open()
        timestamp, elapsed = self._times()
        self._metadata.setdefault(metric, {}).update(metadata)
        self._write(dict(
            timestamp=str(timestamp.timestamp()),
            elapsedtime=str(elapsed),
            datetime=str(timestamp),
            type="METADATA",
            metric=metric,
            metadata=to_json_value(metadata),
        ), flush=True)

    def log(self, step: tuple | list | Any, data: dict) -> None:
        """A LOG line: ``step`` is ``(epoch, step)``, ``(epoch,)`` or ``()`` in the reference."""
        if not self.enabled:
            return
        self._check_open()
        timestamp, elapsed = self._times()
        data = {key: to_json_value(value) for key, value in data.items()}
        step = to_json_value(step)
        if isinstance(step, list):
            step = tuple(step)  # printed as the reference's tuples; a list in the JSON
        self._write(dict(
            timestamp=str(timestamp.timestamp()),
            datetime=str(timestamp),
            elapsedtime=str(elapsed),
            type="LOG",
            step=step,
            data=data,
        ), flush=_is_epoch_level(step))
        if self.stdout:
            metrics = " ".join(_stdout_metric(metric, self._metadata.get(metric, {}), value)
                               for metric, value in data.items())
            print("DLL {} - {} {}".format(timestamp, step, metrics), file=sys.stdout)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        """Flush and close the file; later ``log``/``metadata`` calls raise ``ValueError``."""
        if self._file is not None:
            self._file.close()
            self._file = None
            atexit.unregister(self.close)
        self._closed = True

    def __enter__(self) -> "DLLogger":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("DLLogger is closed")

    def _times(self) -> tuple[datetime, float]:
        timestamp = self._now()
        return timestamp, (timestamp - self.start_time).total_seconds()

    def _write(self, event: dict, flush: bool) -> None:
        if self._file is None:
            return
        self._file.write("DLLL {}\n".format(json.dumps(event)))
        if flush:
            self._file.flush()


def reference_metadata(logger: DLLogger) -> None:
    """Write the five METADATA lines main.py::init_logger writes (test_auc, latency_p90,
    train_loss, time_to_train, throughput), with the same metadata dicts."""
    for metric, metadata in REFERENCE_METADATA:
        logger.metadata(metric, dict(metadata))


def read_log(path: str | os.PathLike) -> list[dict]:
    """The events of a dllogger JSON file: each ``DLLL {json}`` line decoded, others skipped."""
    events = []
    with open(path) as log_file:
        for line in log_file:
            if line.startswith("DLLL "):
                events.append(json.loads(line[len("DLLL "):]))
    return events
