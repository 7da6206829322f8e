"""Read a preprocessed split (parquet + Merlin schema) into batches for one worker of N.

:func:`open_split` checks the directory (parquet files, ``schema.pbtxt``, a label column) and
returns a :class:`Split`. :meth:`Split.loader` gives the Merlin dataloader over one worker's
shard. Two ways to shard:

- ``"rows"`` (default): worker ``r`` of ``n`` reads the rows whose position in the split is
  ``r`` modulo ``n``. Shards differ by at most one row, whatever the partition sizes, and together
  they are the split exactly once.
- ``"partitions"``: the Merlin dataloader's own split by whole partitions (its ``global_rank``,
  ``global_size`` rule): cheaper, but shards are as uneven as the partitions, and with fewer
  partitions than workers some workers read nothing.

Batches come from :class:`Loader`, the Merlin dataloader with four changes: on the CPU, Merlin
23.x converts fixed-length list columns (the histories) one scalar at a time in Python (about
7,000 rows/s here, slower than the model trains), while :class:`Loader` reads them as Arrow
columns and reshapes each column's flat values into a [rows, length] numpy array without a
copy (the same tensors; rows are shuffled as numpy arrays; parquet decoding is then most of the
cost: about 195,000 samples/s here for the Books-size data); Merlin's reading thread polls its full
queue every microsecond, taking a core from training (steps about 40% slower), ours waits on it;
Merlin converts each chunk in the training thread when its first batch is asked for (a stall
every 16 steps), ours in the reading thread; and every chunk's values are checked against the
schema (ids within their column's domain, finite floats, a 0/1 label) before TensorFlow sees
them, so bad data gets a :class:`DatasetError` naming the column instead of an error deep inside
an embedding lookup.

Either way, training agrees on the number of steps per epoch (the minimum over workers), since a
worker that runs out of batches would otherwise leave the others waiting in a collective.

Example::

    >>> split = open_split("data/processed/test")  # doctest: +SKIP
    >>> features, labels = next(iter(split.loader(batch_size=4)))  # doctest: +SKIP
"""
from __future__ import annotations

import functools
import glob
import os
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

SHARDING = ("rows", "partitions")
QUEUE_PUT_WAIT_SECONDS = 0.05


class DatasetError(ValueError):
    """A data set directory that cannot be trained on; the message says which file and why."""


@dataclass
class Split:
    """One split of a preprocessed data set (see :func:`open_split`)."""

    path: str
    dataset: object  # merlin.io.Dataset
    partition_rows: list[int]

    @property
    def schema(self):
        return self.dataset.schema

    @functools.cached_property
    def _loader_dataset(self):
        """The dataset the loaders read: on the CPU, the same files and partitions with
        Arrow-backed columns (a history column stays one flat array of ids instead of a numpy
        array object per row, which :class:`Loader` reshapes without copying)."""
        from merlin.io import Dataset

        if not getattr(self.dataset, "cpu", True):
            return self.dataset
        return Dataset(self.dataset.engine.paths, engine="parquet", schema=self.schema,
                       dtype_backend="pyarrow")

    @property
    def rows(self) -> int:
        return int(sum(self.partition_rows))

    @property
    def label(self) -> str:
        from merlin.schema import Tags

        return self.schema.select_by_tag(Tags.TARGET).column_names[0]

    def shard_rows(self, rank: int = 0, size: int = 1, sharding: str = "rows") -> int:
        """How many rows worker ``rank`` of ``size`` reads."""
        _check_worker(rank, size, sharding)
        if sharding == "rows":
            return len(range(rank, self.rows, size))
        return int(sum(self.partition_rows[i] for i in _partitions_of(len(self.partition_rows),
                                                                        rank, size)))

    def batches(self, batch_size: int, rank: int = 0, size: int = 1, sharding: str = "rows",
                drop_remainder: bool = False) -> int:
        """How many batches worker ``rank``'s loader yields."""
        rows = self.shard_rows(rank, size, sharding)
        return rows // batch_size if drop_remainder else -(-rows // batch_size)

    def loader(self, batch_size: int, rank: int = 0, size: int = 1, sharding: str = "rows",
               shuffle: bool = False, seed: int | None = None, drop_remainder: bool = False,
               columns: list[str] | None = None):
        """The Merlin dataloader over worker ``rank``'s shard, yielding ``(features, labels)``.

        With ``shuffle``, partitions and the rows inside them are permuted; ``seed`` makes the
        order reproducible (pass a different one each epoch). ``columns``: read only these
        (and the label); the others are neither read from the parquet files nor converted.
        """
        import copy

        from merlin.io import Dataset

        _check_worker(rank, size, sharding)
        if self.batches(batch_size, rank, size, sharding, drop_remainder) == 0:
            # Nothing to read (e.g. fewer partitions than workers): Merlin's loader would wait
            # forever for a first batch.
            return []
        if seed is not None:
            np.random.seed(seed % 2**32)
        options = dict(batch_size=batch_size, shuffle=shuffle, drop_last=drop_remainder)
        schema = self.schema
        source = self._loader_dataset
        if columns is not None:
            keep = set(columns) | {self.label}
            schema = schema.select_by_name([n for n in schema.column_names if n in keep])
        if size == 1 and not (shuffle and len(self.partition_rows) > 1):
            dataset = source
            if columns is not None:  # Merlin's reader projects to the dataset's schema
                dataset = copy.copy(dataset)
                dataset.schema = schema
            return Loader(dataset, source=self.path, **options)
        ddf = source.to_ddf()[schema.column_names]
        if sharding == "partitions":
            # Merlin's own split (global_rank/global_size) by the same rule; Merlin itself raises
            # IndexError on every worker when there are fewer partitions than workers.
            parts = [ddf.get_partition(i)
                     for i in _partitions_of(len(self.partition_rows), rank, size)]
        else:
            offsets = np.concatenate([[0], np.cumsum(self.partition_rows)[:-1]]).tolist()
            parts = [
                ddf.get_partition(i).map_partitions(_every_nth_row, int(offsets[i]), rank, size,
                                                    meta=ddf._meta)
                for i in range(ddf.npartitions)
            ]
        if shuffle:
            # Merlin 23.x picks the partitions it reads before it shuffles their order, so its
            # shuffle only permutes rows inside a partition: permute the partitions here.
            parts = [parts[i] for i in np.random.permutation(len(parts))]
        import dask.dataframe as dd

        shard = Dataset(dd.concat(parts), schema=schema)
        return Loader(shard, source=self.path, **options)


def _check_worker(rank: int, size: int, sharding: str) -> None:
    if sharding not in SHARDING:
        raise ValueError(f"sharding must be one of {SHARDING}, got {sharding!r}")
    if not 0 <= rank < size:
        raise ValueError(f"need 0 <= rank < size, got rank {rank} of size {size}")


@functools.lru_cache(maxsize=None)
def _loader_class():
    from merlin.core.dispatch import is_list_dtype
    from merlin.dataloader.tensorflow import Loader as MerlinLoader

    class Loader(MerlinLoader):
        """The Merlin TensorFlow dataloader, converting fixed-length lists with numpy on CPU,
        and with a reading thread that sleeps while its queue is full."""

        source = "the data set"  # named in error messages

        @property
        def _buff(self):
            # Merlin 23.x's reading thread retries a full queue every microsecond
            # (``put_wait=1e-6``): a busy loop that takes a core from training for the whole
            # epoch. A longer wait only delays noticing stop(); a freed slot still wakes the put
            # at once.
            buffer = super()._buff
            buffer.put_wait = QUEUE_PUT_WAIT_SECONDS
            # Rows are shuffled after conversion, as numpy arrays (_convert_df_to_tensors):
            # permuting a pandas frame of Arrow list columns took 0.25 s per 65,536 rows.
            buffer.shuffle = False
            return buffer

        def finished_reading(self) -> bool:
            """The reading thread has queued its last chunk and ended (it draws no more from
            numpy's random state): a next loader may start."""
            workers = getattr(self, "_workers", None)
            return bool(workers) and not any(t.is_alive() for t in workers)

        def make_tensors(self, gdf, use_row_lengths=False):
            # Merlin's make_tensors is a generator: the reading thread only creates it, and the
            # whole chunk's conversion (list columns to arrays, value checks, one tensor per
            # column and batch) then ran in the *training* thread at the chunk's first batch,
            # a ~0.3 s stall every 16 steps. Converting here keeps it in the reading thread.
            return iter([_as_tensorflow(batch)
                         for batch in super().make_tensors(gdf, use_row_lengths)])

        def convert_batch(self, batch):
            # Batches of numpy arrays were already made TensorFlow tensors in the reading
            # thread (_as_tensorflow): Merlin's conversion (its column and table objects) took
            # 4-8 ms per batch of 4096 in the training thread, between two steps.
            if isinstance(batch, _Converted):
                return batch.features, batch.labels
            return super().convert_batch(batch)

        def _convert_df_to_tensors(self, frame):
            import pandas as pd

            if not isinstance(frame, pd.DataFrame):
                # cuDF: Merlin's path is fast (and shuffles the frame itself)
                return super()._convert_df_to_tensors(_shuffled(frame, self.shuffle))
            ragged = [name for name in frame.columns if is_list_dtype(frame[name])
                      and self.input_schema[name].shape.is_ragged]
            if ragged:
                return super()._convert_df_to_tensors(_shuffled(frame, self.shuffle))
            order = np.random.permutation(len(frame)) if self.shuffle else None
            tensors = {}
            for name in list(frame.columns):
                column = frame.pop(name)
                if isinstance(column.dtype, pd.ArrowDtype):
                    values = _arrow_column(column, name)
                elif is_list_dtype(column):
                    values = _stack_rows(column, name)
                else:
                    values = self._to_tensor(column.to_frame())
                if order is not None:
                    values = values[order]
                _check_values(values, self.input_schema[name], self.source)
                tensors[name] = values
            return tensors

    return Loader


class _Converted(NamedTuple):
    """A batch as the training step reads it: {column: tf.Tensor}, labels tf.Tensor (a tuple,
    as Merlin's batches: its loader iterates over them)."""
    features: dict
    labels: object


def _as_tensorflow(batch):
    """Merlin's (features, labels) batch of numpy arrays as TensorFlow tensors, in the form
    Merlin's ``convert_batch`` gives ({column: tensor}, labels tensor; same dtypes and shapes);
    other batches (list columns as values and offsets, GPU arrays) unchanged."""
    features, labels = batch
    if not isinstance(labels, np.ndarray) or not isinstance(features, dict) or not all(
            isinstance(v, np.ndarray) for v in features.values()):
        return batch
    import tensorflow as tf

    return _Converted({name: tf.convert_to_tensor(values) for name, values in features.items()},
                      tf.convert_to_tensor(labels))


def Loader(dataset, source: str = "", **options):
    """The Merlin dataloader (``merlin.dataloader.tensorflow.Loader``) with fast list columns
    whose values are checked against the schema; ``source`` names the data in error messages."""
    loader = _loader_class()(dataset, **options)
    loader.source = source or "the data set"
    return loader


def _check_values(values: np.ndarray, column, source: str) -> None:
    """Raise :class:`DatasetError` when ``values`` break the schema: ids outside the column's
    ``int_domain`` (an embedding lookup would fail deep inside TensorFlow, or silently read a
    wrong row on a GPU), NaN or infinite floats, a label other than 0 or 1."""
    from merlin.schema import Tags

    where = f"{source}: column {column.name!r}"
    if values.dtype.kind == "f":
        bad = ~np.isfinite(values)
        if bad.any():
            raise DatasetError(f"{where}: {int(bad.sum())} value(s) are NaN or infinite "
                               f"(e.g. {values[bad].flat[0]}); expected finite numbers")
    if Tags.TARGET in column.tags:
        bad = (values != 0) & (values != 1)
        if bad.any():
            raise DatasetError(f"{where} is the label (tagged 'target'): expected 0 or 1, got "
                               f"{int(bad.sum())} other value(s) (e.g. {values[bad].flat[0]})")
        return
    domain = column.int_domain
    if domain is None or domain.max is None or values.dtype.kind not in "iu" or not values.size:
        return
    low, high = int(domain.min or 0), int(domain.max)
    smallest, largest = values.min(), values.max()
    if smallest < low or largest > high:
        bad = (values < low) | (values > high)
        raise DatasetError(
            f"{where}: {int(bad.sum())} id(s) outside the schema's domain [{low}, {high}] "
            f"(e.g. {values[bad].flat[0]}); schema.pbtxt's int_domain must cover every id (were "
            "the parquet files and the schema written by different preprocessing runs?)")


def _shuffled(frame, shuffle: bool):
    from merlin.io import shuffle_df

    return shuffle_df(frame, keep_index=True) if shuffle else frame


def _arrow_column(column, name: str) -> np.ndarray:
    """numpy array of a pandas column with an Arrow dtype: [rows] for scalars, [rows, length]
    for fixed-length lists (a view of Arrow's values where the column is one chunk)."""
    import pyarrow as pa

    data = pa.array(column.array)  # its __arrow_array__: the column's own Arrow data
    if isinstance(data, pa.Array):
        data = pa.chunked_array([data])
    if not pa.types.is_list(data.type) and not pa.types.is_large_list(data.type):
        return data.to_numpy()  # nulls become NaN, which _check_values names
    if data.null_count:
        raise DatasetError(f"column {name!r}: some rows are null ({data.null_count} of "
                           f"{len(data)}, no list), but the schema says every row has a list "
                           "of fixed length")
    parts = []
    for chunk in data.chunks:
        rows = np.asarray(chunk.value_lengths())
        if len(rows) and (rows != rows[0]).any():
            lengths = sorted(set(rows.tolist()))
            raise DatasetError(f"column {name!r}: rows have list lengths {lengths[:5]}, but the "
                               "schema says the lists have a fixed length")
        values = chunk.flatten()
        if values.null_count:
            raise DatasetError(f"column {name!r}: {values.null_count} list element(s) are "
                               "null; expected ids")
        parts.append(values.to_numpy().reshape(len(chunk), rows[0] if len(rows) else 0))
    if len(parts) == 1:
        return parts[0]
    widths = {p.shape[1] for p in parts if len(p)}
    if len(widths) > 1:
        raise DatasetError(f"column {name!r}: rows have list lengths {sorted(widths)[:5]}, but "
                           "the schema says the lists have a fixed length")
    width = widths.pop() if widths else 0
    return np.concatenate([p.reshape(len(p), width) for p in parts])


def _stack_rows(column, name: str) -> np.ndarray:
    """[rows, length] array from a pandas column of equal-length arrays."""
    try:
        stacked = np.vstack(column.values)  # as np.stack for equal lengths, twice as fast
        if stacked.dtype == object:  # every row null: vstack makes a [rows, 1] object array
            raise ValueError("null rows")
        return stacked
    except ValueError as error:
        if any(row is None for row in column.values):
            raise DatasetError(f"column {name!r}: some rows are null (no list), but the schema "
                               "says every row has a list of fixed length") from error
        lengths = sorted({len(row) for row in column.values})
        raise DatasetError(f"column {name!r}: rows have list lengths {lengths[:5]}, but the "
                           "schema says the lists have a fixed length") from error


def _every_nth_row(frame, offset: int, rank: int, size: int):
    first = (rank - offset) % size
    return frame.iloc[first::size]


def _partitions_of(partitions: int, rank: int, size: int) -> list[int]:
    """The partitions the Merlin dataloader gives worker ``rank`` (its ceil-division rule)."""
    per_worker = -(-partitions // size)
    return list(range(partitions))[rank * per_worker:(rank + 1) * per_worker]


def open_split(path: str | os.PathLike) -> Split:
    """Open ``path`` (a directory of parquet files with ``schema.pbtxt``) as a :class:`Split`."""
    from merlin.io import Dataset
    from merlin.schema import Tags
    from merlin.schema.io.tensorflow_metadata import TensorflowMetadata

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise DatasetError(f"{path}: no such directory (expected the output of "
                           "workflows/preprocess.py: train/ and test/ with parquet files)")
    files = sorted(glob.glob(os.path.join(path, "*.parquet")))
    if not files:
        raise DatasetError(f"{path}: no *.parquet files")
    schema_file = os.path.join(path, "schema.pbtxt")
    if not os.path.exists(schema_file):
        raise DatasetError(f"{schema_file}: missing; the Merlin schema tells the model which "
                           "column is the label, the target item, the histories and the user")
    try:
        schema = TensorflowMetadata.from_proto_text_file(path).to_merlin_schema()
    except Exception as error:  # a protobuf parse error names no file
        raise DatasetError(f"{schema_file}: not a readable Merlin schema ({error})") from error
    labels = schema.select_by_tag(Tags.TARGET).column_names
    if len(labels) != 1:
        raise DatasetError(f"{schema_file}: expected exactly one column tagged 'target' (the "
                           f"label), got {labels}")
    dataset = Dataset(files, engine="parquet", schema=schema)
    missing = sorted(set(schema.column_names) - set(dataset.to_ddf().columns))
    if missing:
        raise DatasetError(f"{path}: columns {missing} are in schema.pbtxt but not in the "
                           "parquet files")
    rows = dataset.to_ddf()[labels[0]].map_partitions(len).compute().tolist()
    return Split(path, dataset, [int(r) for r in rows])
