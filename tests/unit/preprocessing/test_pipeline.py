"""workflows/preprocess.py end to end, checked against an independent pandas computation."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sim_merlin.datasets.statistics import read_behaviour_log
from sim_merlin.datasets.synthetic import SyntheticConfig, generate
from sim_merlin.preprocessing.pipeline import PreprocessConfig, preprocess
from sim_merlin import schema as conventions

ROOT = Path(__file__).resolve().parents[3]
HISTORY = 12
MIN_USER = 20


def _config(raw, out, **kwargs):
    # Small partitions: users are spread over several, so splitting one would show.
    kwargs.setdefault("users_per_partition", 40)
    return PreprocessConfig(reviews=raw / "reviews_Books.json", meta=raw / "meta_Books.json",
                            output=out, max_sequence_length=HISTORY, seed=5, **kwargs)


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw")
    generate(SyntheticConfig(users=300, items=3000, categories=30, seed=11), raw)
    return raw


@pytest.fixture(scope="module")
def output(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "data"
    summary = preprocess(_config(raw, out))
    return out, summary


def _read(out, split):
    frame = pd.concat([pd.read_parquet(p) for p in sorted((out / split).glob("*.parquet"))],
                      ignore_index=True)
    return frame


def _vocabulary(out, column):
    """Encoded id -> raw value, from the fitted workflow's Categorify vocabulary."""
    path = next((out / "workflow" / "categories").glob(f"unique.{column}.parquet"))
    values = pd.read_parquet(path)[column]
    return dict(zip(values.index + 0, values))


@pytest.fixture(scope="module")
def expected(raw):
    """The reference semantics, computed directly with pandas."""
    log = read_behaviour_log(raw / "reviews_Books.json", raw / "meta_Books.json")
    log = log[log.groupby("user")["item"].transform("size") >= MIN_USER]
    log = log.drop_duplicates(["user", "item", "time"])
    log = log.sort_values(["user", "time", "item"], kind="stable")
    return {user: list(zip(g["item"], g["category"])) for user, g in log.groupby("user")}


def _decode(frame, out):
    users = _vocabulary(out, "user_id")
    items = _vocabulary(out, "item_id")
    frame = frame.copy()
    frame["user"] = frame["user_id"].map(users)
    frame["item"] = frame["item_id"].map(items)
    frame["history"] = frame["item_id_history"].map(lambda h: tuple(items[i] for i in h if i > 0))
    return frame


def test_row_counts_follow_the_reference_formulas(output, expected):
    out, summary = output
    n_users = len(expected)
    assert summary["users"] == n_users > 100
    assert len(_read(out, "test")) == 2 * n_users == summary["test_rows"]
    n_train = sum(len(seq) - 2 for seq in expected.values())
    assert len(_read(out, "train")) == 2 * n_train == summary["train_rows"]


def test_test_rows_hold_the_last_behaviour_and_the_true_history(output, expected):
    out, _ = output
    test = _decode(_read(out, "test"), out)
    positives = test[test["label"] == 1]
    assert len(positives) == len(expected)
    for row in positives.itertuples():
        seq = [item for item, _ in expected[row.user]]
        assert row.item == seq[-1]
        assert row.history == tuple(seq[-1 - HISTORY : -1])


def test_train_positives_are_every_position_with_its_previous_behaviours(output, expected):
    out, _ = output
    train = _decode(_read(out, "train"), out)
    got = sorted(
        (r.user, r.item, r.history) for r in train[train["label"] == 1].itertuples()
    )
    want = sorted(
        (user, seq[k][0], tuple(item for item, _ in seq[max(0, k - HISTORY) : k]))
        for user, seq in expected.items()
        for k in range(1, len(seq) - 1)
    )
    assert got == want


def test_histories_are_left_padded_with_the_newest_behaviour_last(output):
    out, _ = output
    train = _read(out, "train")
    history = np.stack(train["item_id_history"].to_numpy())
    assert history.shape[1] == HISTORY
    filled = history > 0
    # Once a slot is filled every later slot is: zeros only on the left.
    assert (np.diff(filled.astype(int), axis=1) >= 0).all()
    assert filled[:, -1].all()


def test_labels_are_balanced_and_negatives_come_from_the_pool_with_their_category(output, raw, expected):
    out, _ = output
    items = _vocabulary(out, "item_id")
    categories = _vocabulary(out, "category_id")
    pool = {item for seq in expected.values() for item, _ in seq}
    category_of = {item: cat for seq in expected.values() for item, cat in seq}
    for split in ("train", "test"):
        frame = _read(out, split)
        assert frame["label"].mean() == 0.5
        negatives = frame[frame["label"] == 0]
        raw_items = negatives["item_id"].map(items)
        assert set(raw_items) <= pool
        assert (negatives["category_id"].map(categories).to_numpy() == raw_items.map(category_of).to_numpy()).all()
        history = np.stack(frame["item_id_history"].to_numpy())
        negative_history = np.stack(frame["item_id_neg_history"].to_numpy())
        np.testing.assert_array_equal(negative_history > 0, history > 0)
        assert {items[i] for i in np.unique(negative_history[negative_history > 0])} <= pool


def test_schema_tags_domains_and_shapes(output):
    from merlin.io import Dataset
    from merlin.schema import Tags

    out, summary = output
    for split in ("train", "test"):
        schema = Dataset(str(out / split), engine="parquet").schema
        assert schema.select_by_tag(Tags.TARGET).column_names == ["label"]
        assert schema.select_by_tag(Tags.USER_ID).column_names == ["user_id"]
        assert schema.select_by_tag(conventions.TARGET_ITEM).column_names == ["item_id", "category_id"]
        assert schema.select_by_tag(conventions.HISTORY).column_names == [
            "item_id_history", "category_id_history"]
        assert schema.select_by_tag(conventions.NEGATIVE_HISTORY).column_names == [
            "item_id_neg_history", "category_id_neg_history"]
        for feature in ("item_id", "category_id"):
            names = [feature, feature + "_history", feature + "_neg_history"]
            domains = {schema[n].int_domain.name for n in names}
            maxima = {schema[n].int_domain.max for n in names}
            assert domains == {feature}
            assert maxima == {summary["cardinalities"][feature] - 1}
        for name in ("item_id_history", "category_id_neg_history"):
            column = schema[name]
            assert column.is_list and not column.is_ragged
            assert column.properties["value_count"] == {"min": HISTORY, "max": HISTORY}
            assert column.properties["sim"]["padding"] == "left"
            assert column.properties["sim"]["newest"] == "last"
        frame = _read(out, split)
        for name in schema.column_names:
            domain = schema[name].int_domain
            if domain is not None:
                values = frame[name].to_numpy()
                values = np.concatenate(values) if values.dtype == object else values
                assert values.max() <= domain.max and values.min() >= 0


def test_same_seed_gives_identical_files_and_another_seed_other_negatives(output, raw, tmp_path):
    out, _ = output
    again = tmp_path / "again"
    preprocess(_config(raw, again))
    for split in ("train", "test"):
        for path in sorted((out / split).glob("*.parquet")):
            assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(
                (again / split / path.name).read_bytes()).digest()
    other = tmp_path / "other"
    preprocess(PreprocessConfig(**{**_config(raw, other).__dict__, "seed": 6}))
    a, b = _read(out, "test"), _read(other, "test")
    assert sorted(a[a.label == 1]["item_id"]) == sorted(b[b.label == 1]["item_id"])
    assert sorted(a[a.label == 0]["item_id"]) != sorted(b[b.label == 0]["item_id"])


def test_every_column_is_written_non_nullable_and_the_summary_matches(output):
    import pyarrow.parquet as pq

    out, _ = output
    for split in ("train", "test"):
        files = sorted((out / split).glob("*.parquet"))
        rows = 0
        for path in files:
            schema = pq.read_schema(path)
            for field in schema:
                assert not field.nullable, (path, field)
                if hasattr(field.type, "value_field"):
                    assert not field.type.value_field.nullable, (path, field)
            rows += pq.ParquetFile(path).metadata.num_rows
        summary = pq.read_metadata(out / split / "_metadata")
        assert summary.num_rows == rows
        assert {summary.row_group(i).column(0).file_path
                for i in range(summary.num_row_groups)} == {p.name for p in files}


def test_the_merlin_dataloader_reads_the_output_directly(output):
    from merlin.dataloader.tensorflow import Loader
    from merlin.io import Dataset

    out, _ = output
    dataset = Dataset(str(out / "train"), engine="parquet")
    inputs, target = next(iter(Loader(dataset, batch_size=32, shuffle=True, seed_fn=lambda: 1)))
    assert tuple(inputs["item_id_history"].shape) == (32, HISTORY)
    assert tuple(inputs["category_id_neg_history"].shape) == (32, HISTORY)
    assert tuple(inputs["item_id"].shape) in ((32,), (32, 1))
    assert set(np.asarray(target).ravel().tolist()) <= {0, 1}


def test_output_directory_is_refused_unless_overwrite(output, raw):
    from sim_merlin.preprocessing.pipeline import PreprocessingError

    out, _ = output
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(PreprocessingError, match="already exists"):
        preprocess(_config(raw, out))
    assert sorted(p.name for p in out.iterdir()) == before


def test_command_line_accepts_the_reference_flags(raw, tmp_path):
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, str(ROOT / "workflows" / "preprocess.py"),
         "--amazon_dataset_path", str(raw), "--reviews_file_name", "reviews_Books.json",
         "--metadata_file_name", "meta_Books.json", "--output_path", str(out),
         "--max_sequence_length", "8", "--shortest_sequence_for_user", "40"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((out / "preprocess.json").read_text())
    assert summary["config"]["min_user_interactions"] == 40
    assert summary["test_rows"] == 2 * summary["users"]
    assert "CPU path" in result.stderr


def test_several_partitions_are_written_and_each_user_lives_in_one(output):
    out, _ = output
    parts = sorted((out / "train").glob("*.parquet"))
    assert len(parts) >= 4
    owners = {}
    for index, part in enumerate(parts):
        for user in pd.read_parquet(part, columns=["user_id"])["user_id"].unique():
            assert owners.setdefault(user, index) == index


@pytest.mark.parametrize("users_per_partition", [1, 1000])
def test_splits_of_any_size(tmp_path, users_per_partition):
    """Users with three behaviours (one train sample each); with one partition per user the hash
    shuffle leaves some partitions empty."""
    reviews, meta = tmp_path / "r.json", tmp_path / "m.json"
    reviews.write_text("".join(
        json.dumps({"reviewerID": f"U{u}", "asin": f"I{k}", "unixReviewTime": k}) + "\n"
        for u in range(5) for k in range(3)))
    meta.write_text("".join(repr({"asin": f"I{k}"}) + "\n" for k in range(3)))
    summary = preprocess(PreprocessConfig(reviews=reviews, meta=meta, output=tmp_path / "o",
                                          min_user_interactions=3,
                                          users_per_partition=users_per_partition))
    assert (summary["train_rows"], summary["test_rows"]) == (10, 10)
    train = _read(tmp_path / "o", "train")
    assert sorted(train["label"]) == [0] * 5 + [1] * 5
    assert {tuple(h[-2:]) for h in train["item_id_history"]} == {(0, 3)}
