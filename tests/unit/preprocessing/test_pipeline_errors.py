"""Bad input at the pipeline level: clear errors, counts, and nothing half-written."""
import json

import pandas as pd
import pytest

from sim_merlin.preprocessing.pipeline import PreprocessConfig, PreprocessingError, preprocess
from sim_merlin.preprocessing.raw import NO_CATEGORY, RawInputError


def _log(tmp_path, users=4, per_user=6, extra_lines=(), meta_items=None):
    reviews, meta = tmp_path / "reviews.json", tmp_path / "meta.json"
    lines = [
        json.dumps({"reviewerID": f"U{u}", "asin": f"I{(u + k) % 9}", "unixReviewTime": 86400 * k})
        for u in range(users) for k in range(per_user)
    ]
    reviews.write_text("\n".join(lines + list(extra_lines)) + "\n")
    items = range(9) if meta_items is None else meta_items
    meta.write_text("".join(repr({"asin": f"I{i}", "categories": [["Books", f"C{i % 3}"]]}) + "\n"
                            for i in items))
    return reviews, meta


def _config(reviews, meta, out, **kwargs):
    return PreprocessConfig(reviews=reviews, meta=meta, output=out, min_user_interactions=5,
                            max_sequence_length=4, **kwargs)


def _leftovers(parent):
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_a_bad_line_stops_the_run_and_leaves_nothing_behind(tmp_path):
    reviews, meta = _log(tmp_path, extra_lines=['{"reviewerID": "U1", "asin": "I1"}'])
    out = tmp_path / "out"
    with pytest.raises(RawInputError, match=r"reviews.json:25: missing field 'unixReviewTime'"):
        preprocess(_config(reviews, meta, out))
    assert not out.exists() and _leftovers(tmp_path) == []


def test_skip_bad_lines_counts_them(tmp_path):
    reviews, meta = _log(tmp_path, extra_lines=["not json", '{"reviewerID": "U1"}'])
    summary = preprocess(_config(reviews, meta, tmp_path / "out", skip_bad_lines=True))
    assert summary["bad_review_lines_skipped"] == 2
    assert summary["skipped_line_examples"][0].endswith("not a JSON object (Expecting value at column 1)")
    recorded = json.loads((tmp_path / "out" / "preprocess.json").read_text())
    assert recorded["bad_review_lines_skipped"] == 2


def test_no_user_passing_the_filter_is_a_clear_error(tmp_path):
    reviews, meta = _log(tmp_path, per_user=3)
    with pytest.raises(PreprocessingError, match="no user has at least 5 behaviours"):
        preprocess(_config(reviews, meta, tmp_path / "out"))
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_duplicate_meta_items_name_both_lines(tmp_path):
    reviews, meta = _log(tmp_path, meta_items=[0, 1, 2, 3, 1, 4, 5, 6, 7, 8])
    with pytest.raises(PreprocessingError, match=r"item 'I1' appears more than once \(lines 2, 5\)"):
        preprocess(_config(reviews, meta, tmp_path / "out"))
    summary = preprocess(_config(reviews, meta, tmp_path / "out", skip_bad_lines=True))
    assert summary["meta_items"] == 10


def test_items_missing_from_meta_get_the_no_category_id_with_a_warning(tmp_path, capfd):
    reviews, meta = _log(tmp_path, meta_items=[0, 1, 2, 3, 4, 5, 6])
    out = tmp_path / "out"
    summary = preprocess(_config(reviews, meta, out))
    assert summary["reviewed_items_without_meta"] == 2
    assert "2 reviewed items have no line in" in capfd.readouterr().err
    categories = pd.read_parquet(out / "workflow" / "categories" / "unique.category_id.parquet")
    assert NO_CATEGORY in set(categories["category_id"])


def test_gpu_requested_on_a_machine_without_one_is_refused(tmp_path, monkeypatch):
    from sim_merlin import environment

    monkeypatch.setattr(environment, "compute_backend",
                        lambda prefer_gpu=True: environment.ComputeBackend("cpu", "no NVIDIA GPU visible"))
    monkeypatch.setattr("sim_merlin.preprocessing.pipeline.compute_backend",
                        environment.compute_backend)
    reviews, meta = _log(tmp_path)
    with pytest.raises(PreprocessingError, match="--device gpu was requested but no NVIDIA GPU visible"):
        preprocess(_config(reviews, meta, tmp_path / "out", device="gpu"))


@pytest.mark.parametrize("field,value,message", [
    ("min_user_interactions", 2, "min_user_interactions must be >= 3"),
    ("max_sequence_length", 0, "max_sequence_length must be >= 1"),
    ("item_features", ("time",), "reserved"),
    ("device", "tpu", "device must be auto, cpu or gpu"),
])
def test_invalid_options_are_rejected_before_any_work(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        PreprocessConfig(reviews=tmp_path / "r", meta=tmp_path / "m", output=tmp_path / "o",
                         **{field: value})


@pytest.mark.gpu
def test_the_gpu_path_gives_the_cpu_result(tmp_path):
    reviews, meta = _log(tmp_path)
    cpu = preprocess(_config(reviews, meta, tmp_path / "cpu", device="cpu"))
    gpu = preprocess(_config(reviews, meta, tmp_path / "gpu", device="gpu"))
    assert gpu["backend"] == "gpu" and cpu["backend"] == "cpu"
    for split in ("train", "test"):
        a = pd.read_parquet(next((tmp_path / "cpu" / split).glob("*.parquet")))
        b = pd.read_parquet(next((tmp_path / "gpu" / split).glob("*.parquet")))
        pd.testing.assert_frame_equal(a, b)
