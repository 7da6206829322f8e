"""Reading raw files: exact error locations, skipping with counts, gzip, both meta syntaxes."""
import gzip
import json

import pandas as pd
import pyarrow.parquet as pq
import pytest

from sim_merlin.preprocessing import raw


def _review(user="A1", item="B1", stamp=86400, **extra):
    return json.dumps({"reviewerID": user, "asin": item, "unixReviewTime": stamp, **extra})


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _table(result):
    return pd.concat([pq.read_table(p).to_pandas() for p in result.parts], ignore_index=True)


@pytest.mark.parametrize("chunk_bytes", [64, 2**20])
@pytest.mark.parametrize("workers", [1, 2])
def test_reviews_are_read_in_order_whatever_the_chunking(tmp_path, chunk_bytes, workers):
    lines = [_review(f"A{i % 7}", f"B{i}", 86400 * i, overall=5.0, reviewText="x" * (i % 50))
             for i in range(300)]
    result = raw.read_reviews(_write(tmp_path / "r.json", lines), tmp_path / "out",
                              workers=workers, chunk_bytes=chunk_bytes)
    table = _table(result)
    assert result.rows == 300 and result.lines == 300 and result.skipped == 0
    assert table["item_id"].tolist() == [f"B{i}" for i in range(300)]
    assert table["time"].tolist() == [86400 * i for i in range(300)]


BAD_REVIEWS = [
    ('{"reviewerID": "A2", "asin": "B2", "unixReviewTime": 5', "not a JSON object"),
    ('{"asin": "B2", "unixReviewTime": 5}', "missing field 'reviewerID'"),
    ('{"reviewerID": "A2", "unixReviewTime": 5}', "missing field 'asin'"),
    ('{"reviewerID": "A2", "asin": "B2"}', "missing field 'unixReviewTime'"),
    ('{"reviewerID": "A2", "asin": "B2", "unixReviewTime": "5"}', "must be an integer"),
    ('{"reviewerID": "A2", "asin": "B2", "unixReviewTime": 5.5}', "must be an integer"),
    ('{"reviewerID": "A2", "asin": "B2", "unixReviewTime": -5}', "must be >= 0"),
    ('{"reviewerID": "", "asin": "B2", "unixReviewTime": 5}', "non-empty string"),
    ('["A2", "B2", 5]', "expected a JSON object"),
]


@pytest.mark.parametrize("bad,message", BAD_REVIEWS)
def test_a_bad_review_line_is_named_by_file_and_line(tmp_path, bad, message):
    path = _write(tmp_path / "reviews.json", [_review(), _review("A3"), bad, _review("A4")])
    with pytest.raises(raw.RawInputError, match=rf"reviews.json:3: .*{message}"):
        raw.read_reviews(path, tmp_path / "out")
    result = raw.read_reviews(path, tmp_path / "skip", skip_bad_lines=True)
    assert (result.rows, result.skipped) == (3, 1)
    assert result.examples[0].startswith(f"{path}:3:")
    assert _table(result)["user_id"].tolist() == ["A1", "A3", "A4"]


def test_gzip_reviews_and_blank_lines(tmp_path):
    path = tmp_path / "reviews.json.gz"
    with gzip.open(path, "wt") as handle:
        handle.write(_review() + "\n\n" + _review("A2") + "\n")
    result = raw.read_reviews(path, tmp_path / "out")
    assert _table(result)["user_id"].tolist() == ["A1", "A2"]


def test_a_truncated_gzip_file_is_reported(tmp_path):
    data = gzip.compress(("".join(_review(f"A{i}") + "\n" for i in range(2000))).encode())
    path = tmp_path / "reviews.json.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(raw.RawInputError, match="reviews.json.gz: cannot read the file"):
        raw.read_reviews(path, tmp_path / "out")


@pytest.mark.parametrize("name,content,message", [
    ("missing.json", None, "reviews file not found"),
    ("empty.json", "", "reviews file is empty"),
])
def test_missing_and_empty_files(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(raw.RawInputError, match=message):
        raw.read_reviews(path, tmp_path / "out")


def test_meta_accepts_python_literals_and_json_and_takes_the_first_path_leaf(tmp_path):
    lines = [
        repr({"asin": "B1", "title": "It's", "categories": [["Books", "Poetry"], ["Books", "Art"]]}),
        json.dumps({"asin": "B2", "categories": [["Books"]], "brand": "Acme"}),
        repr({"asin": "B3", "title": "no categories"}),
        repr({"asin": "B4", "categories": []}),
    ]
    result = raw.read_meta(_write(tmp_path / "meta.json", lines), tmp_path / "out",
                           item_features=["brand"])
    table = _table(result)
    assert table["item"].tolist() == ["B1", "B2", "B3", "B4"]
    assert table["category"].tolist() == ["Poetry", "Books", raw.NO_CATEGORY, raw.NO_CATEGORY]
    assert table["brand"].tolist() == [None, "Acme", None, None]
    assert table["line"].tolist() == [1, 2, 3, 4]


@pytest.mark.parametrize("bad,message", [
    ("{'asin': 'B9', 'categories': [['Books', 'X']]", "neither JSON nor a Python literal"),
    ("{'title': 'no asin'}", "field 'asin' must be a non-empty string"),
    ("['B9']", "expected a dict"),
    ("{'asin': 'B9', 'categories': 'Books'}", "must be a list of category paths"),
])
def test_a_bad_meta_line_is_named_by_file_and_line(tmp_path, bad, message):
    path = _write(tmp_path / "meta.json", [repr({"asin": "B1"}), bad])
    with pytest.raises(raw.RawInputError, match=rf"meta.json:2: .*{message}"):
        raw.read_meta(path, tmp_path / "out")
    result = raw.read_meta(path, tmp_path / "skip", skip_bad_lines=True)
    assert (result.rows, result.skipped) == (1, 1)
