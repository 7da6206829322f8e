"""sim_merlin.training.data on a real preprocessed data set, checked against the parquet files
(read with pandas) and against Merlin's own dataloader."""
import re
import shutil
import threading
from collections import Counter

import numpy as np
import pandas as pd
import pytest

import sim_merlin  # noqa: F401  (before tensorflow)
from sim_merlin.training import data
from sim_merlin.training.data import DatasetError, Split, open_split

# Uneven partitions for the multi-partition split: offsets 0, 1001, 4000, 4503, 9000 are not all
# multiples of 2 or 3, so "rows" sharding has to carry each partition's offset.
CUTS = [0, 1001, 4000, 4503, 9000]


# ---------------------------------------------------------------- helpers


def read_frame(path):
    """The split's rows in order, straight from its parquet files (sorted by name)."""
    files = sorted(path.glob("*.parquet"))
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def _fingerprints(arrays):
    """One hashable fingerprint per row of ``arrays`` (1-D or 2-D integer arrays): the bytes of
    the row's values as int64, every column included."""
    matrix = np.concatenate([np.asarray(a, np.int64).reshape(len(a), -1) for a in arrays], axis=1)
    return [row.tobytes() for row in matrix]


def frame_rows(frame, columns):
    """Fingerprints of the rows of a pandas frame (list cells stacked), in order."""
    arrays = []
    for name in columns:
        values = frame[name].to_numpy()
        arrays.append(np.stack(values) if values.dtype == object else values)
    return _fingerprints(arrays)


def loader_rows(loader, columns, label):
    """Fingerprints of everything ``loader`` yields, in order, and the batch sizes. Always
    consumes the whole loader: an abandoned Merlin loader keeps its thread (and its use of the
    global numpy random state) alive."""
    rows, sizes = [], []
    for features, labels in loader:
        rows.extend(_fingerprints([(labels if name == label else features[name]).numpy()
                                   for name in columns]))
        sizes.append(len(labels))
    return rows, sizes


def merlin_loader(dataset, **options):
    from merlin.dataloader.tensorflow import Loader

    return Loader(dataset, **options)


@pytest.fixture(scope="module")
def train_dir(tiny_dataset):
    return tiny_dataset / "train"


@pytest.fixture(scope="module")
def train(train_dir):
    return open_split(train_dir)


@pytest.fixture(scope="module")
def columns(train):
    return train.schema.column_names


@pytest.fixture(scope="module")
def train_rows(train_dir, columns):
    return frame_rows(read_frame(train_dir), columns)


@pytest.fixture(scope="module")
def multi_dir(train_dir, tmp_path_factory):
    """The train split written as 5 parquet files of uneven sizes (5 partitions)."""
    frame = read_frame(train_dir)
    path = tmp_path_factory.mktemp("multi") / "train"
    path.mkdir()
    bounds = CUTS + [len(frame)]
    for index in range(len(CUTS)):
        frame.iloc[bounds[index]:bounds[index + 1]].to_parquet(
            path / f"part_{index}.parquet", index=False)
    shutil.copy(train_dir / "schema.pbtxt", path)
    return path


@pytest.fixture(scope="module")
def multi(multi_dir):
    return open_split(multi_dir)


@pytest.fixture(scope="module")
def splits(train, multi):
    """Both layouts of the same rows: one partition and five."""
    return {"one_partition": train, "five_partitions": multi}


# ---------------------------------------------------------------- open_split


def test_open_split_reads_the_preprocessed_split(train, train_dir, train_rows, multi):
    assert isinstance(train, Split)
    assert train.path == str(train_dir)
    assert train.label == "label"
    assert train.rows == len(train_rows) > 1000
    assert train.partition_rows == [len(train_rows)]
    sizes = np.diff(CUTS + [len(train_rows)]).tolist()
    assert multi.partition_rows == sizes
    assert multi.rows == train.rows
    assert train.schema["item_id_history"].shape.dims[1].max == 20


def test_open_split_test_split(tiny_dataset):
    split = open_split(tiny_dataset / "test")
    frame = read_frame(tiny_dataset / "test")
    assert split.rows == len(frame) > 0
    assert set(frame["label"]) == {0, 1}


# ---------------------------------------------------------------- the fast Loader


@pytest.mark.parametrize("name, batch_size", [("train", 500), ("test", 64)])
def test_fast_loader_yields_exactly_merlins_tensors(tiny_dataset, name, batch_size, monkeypatch):
    split = open_split(tiny_dataset / name)
    stacked = []
    original = data._arrow_column

    def arrow_column(column, name):
        values = original(column, name)
        if values.ndim == 2:
            stacked.append(name)
        return values

    monkeypatch.setattr(data, "_arrow_column", arrow_column)
    converted_in = []  # threads that made the batches TensorFlow tensors
    to_tensorflow = data._as_tensorflow

    def as_tensorflow(batch):
        result = to_tensorflow(batch)
        converted_in.append((isinstance(result, data._Converted),
                             threading.current_thread() is threading.main_thread()))
        return result

    monkeypatch.setattr(data, "_as_tensorflow", as_tensorflow)
    fast = list(split.loader(batch_size))
    # Every batch was converted, in the reading thread, not between training steps.
    assert converted_in == [(True, False)] * split.batches(batch_size)
    merlin = list(merlin_loader(split.dataset, batch_size=batch_size, shuffle=False))
    # The Arrow-to-numpy path really ran, for every list column of every chunk.
    histories = [c for c in split.schema.column_names if c.endswith("history")]
    assert set(stacked) == set(histories) and len(histories) == 4
    assert len(fast) == len(merlin) == split.batches(batch_size)
    for (features, labels), (expected, expected_labels) in zip(fast, merlin):
        assert sorted(features) == sorted(expected)
        for column, tensor in expected.items():
            assert features[column].dtype == tensor.dtype, column
            assert features[column].shape == tensor.shape, column
            np.testing.assert_array_equal(features[column].numpy(), tensor.numpy(), column)
        assert labels.dtype == expected_labels.dtype and labels.shape == expected_labels.shape
        np.testing.assert_array_equal(labels.numpy(), expected_labels.numpy())
    features, _ = fast[0]
    assert features["item_id_history"].shape == (batch_size, 20)


def test_fast_loader_yields_the_parquet_rows_in_order(train, columns, train_rows):
    rows, sizes = loader_rows(train.loader(1000), columns, train.label)
    assert rows == train_rows
    assert sizes == [1000] * (len(train_rows) // 1000) + [len(train_rows) % 1000]


@pytest.mark.parametrize("layout,size", [("one_partition", 1), ("five_partitions", 2)])
def test_a_loader_of_some_columns_reads_only_those(splits, layout, size, train_dir, monkeypatch):
    split = splits[layout]
    wanted = ["user_id", "item_id", "category_id", "item_id_history", "category_id_history"]
    converted = []
    original = data._check_values
    monkeypatch.setattr(data, "_check_values",
                        lambda values, column, source: converted.append(column.name)
                        or original(values, column, source))
    rows = {}
    for rank in range(size):
        for features, labels in split.loader(100, rank, size, columns=wanted):
            assert sorted(features) == sorted(wanted)
            for name in wanted + [split.label]:
                value = labels if name == split.label else features[name]
                rows.setdefault(name, []).append(value.numpy().reshape(len(labels), -1))
    assert set(converted) == set(wanted) | {split.label}  # the negatives were never converted
    frame = read_frame(train_dir)
    for name in wanted + [split.label]:
        got = np.concatenate(rows[name])
        values = frame[name].to_numpy()
        expected = (np.stack(values) if values.dtype == object else values).reshape(len(got), -1)
        # Same rows (in worker-interleaved order for 2 workers): compare as sorted multisets.
        assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, expected.tolist()))


def test_fast_loader_is_a_merlin_loader(train):
    from merlin.dataloader.tensorflow import Loader as MerlinLoader

    loader = train.loader(8)
    assert isinstance(loader, MerlinLoader)
    loader.stop()


def test_reading_thread_sleeps_while_its_queue_is_full(multi):
    """Merlin 23.x's reading thread polls a full queue every microsecond, burning a core that
    training needs; ours must wait idle. With 5 partitions and one batch taken, the thread has
    the next chunk ready and nowhere to put it: the process must use (almost) no CPU meanwhile."""
    import time

    loader = multi.loader(100)
    next(iter(loader))
    time.sleep(1.0)  # the reading thread converts the next chunk, then finds the queue full
    assert not loader._buff.empty
    cpu_before, wall_before = time.process_time(), time.perf_counter()
    time.sleep(1.0)
    cpu = time.process_time() - cpu_before
    wall = time.perf_counter() - wall_before
    loader.stop()
    assert cpu < 0.25 * wall, f"the loader used {cpu:.2f} s of CPU in {wall:.2f} s while idle"


def test_arrow_columns_become_numpy_rows_across_chunks_and_slices():
    import pandas as pd
    import pyarrow as pa

    rows = np.arange(60, dtype=np.int32).reshape(12, 5)
    chunks = [pa.array(list(rows[:4])), pa.array(list(rows[4:]))]
    sliced = pa.chunked_array([chunks[0].slice(1, 3), chunks[1].slice(2, 5)])
    column = pd.Series(pd.arrays.ArrowExtensionArray(sliced))
    got = data._arrow_column(column, "history")
    np.testing.assert_array_equal(got, np.concatenate([rows[1:4], rows[6:11]]))
    scalars = pd.Series(pd.arrays.ArrowExtensionArray(pa.chunked_array([[1, 2], [3]])))
    np.testing.assert_array_equal(data._arrow_column(scalars, "item_id"), [1, 2, 3])
    ragged = pd.Series(pd.arrays.ArrowExtensionArray(pa.chunked_array([[[1, 2]], [[3]]])))
    with pytest.raises(DatasetError, match=r"'history': rows have list lengths \[1, 2\]"):
        data._arrow_column(ragged, "history")
    holes = pd.Series(pd.arrays.ArrowExtensionArray(pa.chunked_array([[[1, None]]])))
    with pytest.raises(DatasetError, match=r"'history': 1 list element\(s\) are null"):
        data._arrow_column(holes, "history")


@pytest.mark.parametrize("damage, message", [
    (lambda history: history[:19], r"'item_id_history': rows have list lengths \[19, 20\]"),
    (lambda history: None, r"'item_id_history': some rows are null"),
])
def test_broken_list_columns_raise_dataset_error_naming_the_column(train_dir, tmp_path, damage,
                                                                   message):
    frame = read_frame(train_dir).iloc[:300].copy()
    row = frame.index[150]
    frame.at[row, "item_id_history"] = damage(frame.at[row, "item_id_history"])
    frame.to_parquet(tmp_path / "part_0.parquet", index=False)
    shutil.copy(train_dir / "schema.pbtxt", tmp_path)
    split = open_split(tmp_path)
    with pytest.raises(DatasetError, match=message):
        for _ in split.loader(64):
            pass


# ---------------------------------------------------------------- "rows" sharding


@pytest.mark.parametrize("layout", ["one_partition", "five_partitions"])
@pytest.mark.parametrize("size", [2, 3])
def test_rows_sharding_partitions_the_split_exactly(splits, layout, size, columns, train_rows):
    split = splits[layout]
    batch_size = 384
    shards = []
    for rank in range(size):
        rows, sizes = loader_rows(split.loader(batch_size, rank, size), columns, split.label)
        # Worker `rank` reads rows rank, rank + size, ... of the split, in order.
        assert rows == train_rows[rank::size]
        assert len(rows) == split.shard_rows(rank, size) == split.shard_rows(rank, size, "rows")
        assert len(sizes) == split.batches(batch_size, rank, size)
        assert all(n == batch_size for n in sizes[:-1]) and 0 < sizes[-1] <= batch_size
        shards.append(rows)
    lengths = [len(rows) for rows in shards]
    assert max(lengths) - min(lengths) <= 1
    assert sum(lengths) == len(train_rows)
    # Together they are the split exactly once (as a multiset: the data has repeated rows).
    assert sum((Counter(rows) for rows in shards), Counter()) == Counter(train_rows)


@pytest.mark.parametrize("size, rank", [(2, 1), (3, 0), (3, 2)])
def test_rows_sharding_drop_remainder(multi, size, rank, columns, train_rows):
    batch_size = 500
    expected = train_rows[rank::size]
    assert len(expected) % batch_size  # there is a remainder to drop
    rows, sizes = loader_rows(multi.loader(batch_size, rank, size, drop_remainder=True),
                              columns, multi.label)
    assert sizes == [batch_size] * multi.batches(batch_size, rank, size, drop_remainder=True)
    assert len(sizes) == len(expected) // batch_size
    assert rows == expected[:len(rows)]


def test_shard_rows_and_batches_arithmetic(train):
    rows = train.rows
    for size in (1, 2, 3, 7):
        counts = [train.shard_rows(rank, size) for rank in range(size)]
        assert sum(counts) == rows and max(counts) - min(counts) <= 1
        assert counts == sorted(counts, reverse=True)
        for rank, count in enumerate(counts):
            assert train.batches(64, rank, size) == -(-count // 64)
            assert train.batches(64, rank, size, drop_remainder=True) == count // 64


@pytest.mark.parametrize("kwargs", [dict(sharding="row"), dict(rank=2, size=2),
                                    dict(rank=-1, size=2), dict(rank=0, size=0)])
def test_invalid_workers_raise_value_error(train, kwargs):
    with pytest.raises(ValueError, match="sharding|rank"):
        train.loader(8, **kwargs)
    with pytest.raises(ValueError, match="sharding|rank"):
        train.shard_rows(**kwargs)


@pytest.fixture(scope="module")
def small_dir(train_dir, tmp_path_factory):
    """8 rows in partitions of 1, 2 and 5 rows."""
    frame = read_frame(train_dir)
    path = tmp_path_factory.mktemp("small") / "train"
    path.mkdir()
    for index, (start, stop) in enumerate([(0, 1), (1, 3), (3, 8)]):
        frame.iloc[start:stop].to_parquet(path / f"part_{index}.parquet", index=False)
    shutil.copy(train_dir / "schema.pbtxt", path)
    return path


@pytest.mark.timeout(60)  # Merlin's loader waits forever when it has no batch at all
def test_tiny_partitions_and_empty_shards(small_dir, columns):
    split = open_split(small_dir)
    expected = frame_rows(read_frame(small_dir), columns)
    assert split.partition_rows == [1, 2, 5]
    for size in (3, 10):
        shards = []
        for rank in range(size):
            loader = split.loader(2, rank, size)
            rows, sizes = loader_rows(loader, columns, split.label)
            assert rows == expected[rank::size]
            assert len(rows) == split.shard_rows(rank, size)
            assert len(sizes) == split.batches(2, rank, size)
            if not rows:
                assert loader == []
            shards.append(rows)
        assert sum(shards, []) == sum((expected[r::size] for r in range(size)), [])
    # Fewer rows than one batch, dropped: no batch at all.
    assert split.batches(16, drop_remainder=True) == 0
    assert list(split.loader(16, drop_remainder=True, shuffle=True, seed=1)) == []
    assert list(split.loader(4, 1, 2, drop_remainder=True)) != []


# ---------------------------------------------------------------- "partitions" sharding


@pytest.mark.parametrize("size", [2, 3, 5])
def test_partitions_sharding_is_merlins_global_split(multi, size, columns, train_rows):
    batch_size = 700
    shards = []
    for rank in range(size):
        rows, sizes = loader_rows(multi.loader(batch_size, rank, size, "partitions"), columns,
                                  multi.label)
        expected, expected_sizes = loader_rows(
            merlin_loader(multi.dataset, batch_size=batch_size, global_rank=rank,
                          global_size=size), columns, multi.label)
        assert rows == expected and sizes == expected_sizes
        assert len(rows) == multi.shard_rows(rank, size, "partitions")
        assert len(sizes) == multi.batches(batch_size, rank, size, "partitions")
        shards.append(rows)
    assert sum(shards, []) == train_rows  # whole partitions, in order
    # The shards are whole partitions: as uneven as they are.
    assert len({len(rows) for rows in shards}) == size


@pytest.mark.parametrize("size, assignment", [
    (4, [[0, 1], [2, 3], [4], []]),
    (6, [[0], [1], [2], [3], [4], []]),
    (7, [[0], [1], [2], [3], [4], [], []]),
])
def test_partitions_sharding_with_few_partitions(multi, size, assignment, columns, train_rows):
    """Merlin hangs (size 4: a worker whose slice is empty) or raises IndexError on every worker
    (more workers than partitions); here the workers with partitions read them (Merlin's
    ceil(partitions / size) rule), the others read nothing, and shard_rows agrees."""
    bounds = CUTS + [len(train_rows)]
    for rank, partitions in enumerate(assignment):
        expected = sum((train_rows[bounds[i]:bounds[i + 1]] for i in partitions), [])
        rows, sizes = loader_rows(multi.loader(1000, rank, size, "partitions"), columns,
                                  multi.label)
        assert rows == expected
        assert multi.shard_rows(rank, size, "partitions") == len(expected)
        assert multi.batches(1000, rank, size, "partitions") == len(sizes)


def test_partitions_sharding_of_a_one_partition_split(train, columns, train_rows):
    first, _ = loader_rows(train.loader(2000, 0, 2, "partitions"), columns, train.label)
    second, _ = loader_rows(train.loader(2000, 1, 2, "partitions"), columns, train.label)
    assert first == train_rows and second == []
    assert train.shard_rows(0, 2, "partitions") == train.rows
    assert train.shard_rows(1, 2, "partitions") == train.batches(64, 1, 2, "partitions") == 0


# ---------------------------------------------------------------- shuffle


@pytest.mark.parametrize("layout, rank, size, sharding", [
    ("one_partition", 0, 1, "rows"),
    ("five_partitions", 0, 1, "rows"),
    ("five_partitions", 1, 2, "rows"),
    ("five_partitions", 0, 2, "partitions"),
])
def test_shuffle_is_reproducible_and_a_permutation(splits, layout, rank, size, sharding, columns):
    split = splits[layout]

    def run(seed, shuffle=True):
        loader = split.loader(512, rank, size, sharding, shuffle=shuffle, seed=seed)
        return loader_rows(loader, columns, split.label)

    plain, _ = run(None, shuffle=False)
    first, sizes = run(7)
    again, _ = run(7)
    other, _ = run(8)
    assert first == again
    assert first != other and first != plain
    assert Counter(first) == Counter(other) == Counter(plain)
    assert len(sizes) == split.batches(512, rank, size, sharding)


def test_shuffle_permutes_the_partitions_too(multi, columns, train_rows):
    """Merlin 23.x only shuffles the rows inside each partition: without a permutation of the
    partitions every epoch would start with partition 0."""
    bounds = CUTS + [len(train_rows)]
    counts = Counter(train_rows)
    partition_of = {row: index for index in range(5)
                    for row in train_rows[bounds[index]:bounds[index + 1]] if counts[row] == 1}
    firsts = []
    for seed in range(5):
        rows, _ = loader_rows(multi.loader(500, shuffle=True, seed=seed), columns, multi.label)
        # The first batch comes from one partition (each has more than 500 rows) ...
        first_batch = {partition_of[row] for row in rows[:500] if row in partition_of}
        assert len(first_batch) == 1
        firsts.extend(first_batch)
    # ... but not always in the order of the files.
    assert len(set(firsts)) > 1


# ---------------------------------------------------------------- open_split errors


@pytest.fixture
def copy_split(train_dir, tmp_path):
    """A writable copy of the first rows of the train split under tmp_path/split."""
    def make(rows=100, drop=(), schema=True):
        path = tmp_path / "split"
        path.mkdir()
        read_frame(train_dir).iloc[:rows].drop(columns=list(drop)).to_parquet(
            path / "part_0.parquet", index=False)
        if schema:
            shutil.copy(train_dir / "schema.pbtxt", path)
        return path

    return make


def test_missing_directory(tmp_path):
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "nowhere")) + ": no such"):
        open_split(tmp_path / "nowhere")


def test_directory_without_parquet(tmp_path, train_dir):
    shutil.copy(train_dir / "schema.pbtxt", tmp_path)
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path)) + r": no \*\.parquet"):
        open_split(tmp_path)


def test_directory_without_schema(copy_split):
    path = copy_split(schema=False)
    with pytest.raises(DatasetError, match=re.escape(str(path / "schema.pbtxt")) + ": missing"):
        open_split(path)


def test_unreadable_schema(copy_split):
    path = copy_split()
    (path / "schema.pbtxt").write_text("feature { name: 'label' type: NOT_A_TYPE")
    with pytest.raises(DatasetError, match=re.escape(str(path / "schema.pbtxt"))):
        open_split(path)


def test_schema_without_a_target(copy_split):
    path = copy_split()
    text = (path / "schema.pbtxt").read_text()
    assert text.count('tag: "target"') == 1
    (path / "schema.pbtxt").write_text(text.replace('tag: "target"\n', ""))
    with pytest.raises(DatasetError, match=r"schema\.pbtxt: expected exactly one column tagged "
                                           r"'target'"):
        open_split(path)


def test_schema_columns_missing_from_the_parquet(copy_split):
    path = copy_split(drop=["category_id_neg_history", "user_id"])
    with pytest.raises(DatasetError) as error:
        open_split(path)
    message = str(error.value)
    assert message.startswith(str(path))
    assert "['category_id_neg_history', 'user_id']" in message
    assert issubclass(DatasetError, ValueError)


def test_extra_parquet_columns_are_not_read(copy_split, columns):
    path = copy_split(rows=40)
    frame = pd.read_parquet(path / "part_0.parquet")
    frame["unused"] = np.arange(len(frame))
    frame.to_parquet(path / "part_0.parquet", index=False)
    [(features, labels)] = list(open_split(path).loader(64))
    assert sorted(features) == sorted(set(columns) - {"label"}) and len(labels) == 40
