"""Rewriting a split's parquet files with non-nullable columns: same values, same row groups,
a matching _metadata summary, nulls refused, nothing half-written left behind."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sim_merlin.preprocessing.required_columns import require_values, required_schema


def _split(tmp_path, parts=2, rows=50, group=20, nulls=False):
    rng = np.random.default_rng(3)
    collected = []
    tables = []
    for part in range(parts):
        history = rng.integers(0, 1000, (rows, 7)).astype(np.int32)
        table = pa.table({
            "label": pa.array(rng.integers(0, 2, rows).astype(np.int8)),
            "user_id": pa.array(rng.integers(0, 99, rows)),
            "item_id_history": pa.array(list(history), pa.list_(pa.int32())),
            "rating": pa.array(rng.random(rows).astype(np.float32)),
        })
        if nulls and part == 1:
            values = table.column("item_id_history").to_pylist()
            values[3][2] = None
            table = table.set_column(2, "item_id_history", pa.array(values, pa.list_(pa.int32())))
        path = tmp_path / f"part_{part}.parquet"
        pq.write_table(table, path, row_group_size=group, metadata_collector=collected)
        collected[-1].set_file_path(path.name)
        tables.append(table)
    pq.write_metadata(tables[0].schema, tmp_path / "_metadata", metadata_collector=collected)
    return tables


def test_values_and_row_groups_are_kept_and_every_field_is_required(tmp_path):
    tables = _split(tmp_path)
    assert require_values(tmp_path) == 2
    for part, table in enumerate(tables):
        path = tmp_path / f"part_{part}.parquet"
        written = pq.ParquetFile(path)
        assert [written.metadata.row_group(i).num_rows
                for i in range(written.num_row_groups)] == [20, 20, 10]
        schema = written.schema_arrow
        assert all(not f.nullable for f in schema)
        assert not schema.field("item_id_history").type.value_field.nullable
        read = written.read()
        for name in table.column_names:
            assert read.column(name).to_pylist() == table.column(name).to_pylist()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "_metadata", "part_0.parquet", "part_1.parquet"]  # no temporary file left


def test_the_summary_points_at_the_rewritten_row_groups(tmp_path):
    tables = _split(tmp_path)
    require_values(tmp_path)
    summary = pq.read_metadata(tmp_path / "_metadata")
    assert summary.num_rows == 100 and summary.num_row_groups == 6
    assert summary.schema.to_arrow_schema() == required_schema(tables[0].schema)
    # A reader that trusts the summary's offsets (as Dask does) gets the values back.
    dataset = pq.ParquetDataset(tmp_path)
    read = dataset.read().sort_by([("user_id", "ascending")])
    expected = pa.concat_tables(tables).sort_by([("user_id", "ascending")])
    assert sorted(read.column("item_id_history").to_pylist()) == sorted(
        expected.column("item_id_history").to_pylist())
    for i in range(summary.num_row_groups):
        group = summary.row_group(i)
        file = pq.ParquetFile(tmp_path / group.column(0).file_path)
        offsets = {file.metadata.row_group(j).column(0).data_page_offset
                   for j in range(file.num_row_groups)}
        assert group.column(0).data_page_offset in offsets


def test_merlin_reads_the_rewritten_split(tmp_path):
    from merlin.io import Dataset

    tables = _split(tmp_path)
    require_values(tmp_path)
    frame = Dataset(str(tmp_path), engine="parquet").to_ddf().compute()
    assert len(frame) == 100
    expected = pa.concat_tables(tables).column("item_id_history").to_pylist()
    assert sorted(map(list, frame["item_id_history"])) == sorted(expected)


def test_a_null_is_refused_naming_the_file_and_column_and_the_file_is_untouched(tmp_path):
    _split(tmp_path, nulls=True)
    before = (tmp_path / "part_1.parquet").read_bytes()
    with pytest.raises(ValueError, match=r"part_1\.parquet: column 'item_id_history' holds nulls"):
        require_values(tmp_path)
    assert (tmp_path / "part_1.parquet").read_bytes() == before
    assert not list(tmp_path.glob(".*partial"))
