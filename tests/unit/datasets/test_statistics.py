import gzip
import json

import numpy as np
import pandas as pd
import pytest

from sim_merlin.datasets import statistics as st


def _brute_force(user, category, probe, short, long):
    """Direct definition: scan each user's history backwards."""
    distance = np.zeros(len(user), dtype=np.int64)
    in_long = np.zeros(len(user), dtype=bool)
    in_short = np.zeros(len(user), dtype=bool)
    for t in range(len(user)):
        history = [s for s in range(t) if user[s] == user[t]]
        for back, s in enumerate(reversed(history), 1):
            if category[s] == category[t] and distance[t] == 0:
                distance[t] = back
        for back, s in enumerate(reversed(history), 1):
            if category[s] == probe[t]:
                in_short[t] = back <= short
                in_long[t] = short < back <= short + long
                break
    return distance, in_long, in_short


def test_recurrence_distances_and_windows_match_a_direct_scan():
    rng = np.random.default_rng(0)
    user = np.sort(rng.integers(0, 6, 400))
    category = rng.integers(0, 5, 400)
    probe = rng.integers(0, 5, 400)
    distance, in_long, in_short = _brute_force(user, category, probe, short=3, long=7)
    np.testing.assert_array_equal(st._previous_distance(user, category), distance)
    got_long, got_short = st._window_hits(user, category, probe, short=3, long=7)
    np.testing.assert_array_equal(got_long, in_long)
    np.testing.assert_array_equal(got_short, in_short)


def test_gini_of_known_distributions():
    assert st.gini(np.ones(10)) == pytest.approx(0.0)
    assert st.gini(np.r_[np.zeros(99), 1.0]) == pytest.approx(0.99)
    x = np.array([1.0, 2.0, 3.0, 4.0])
    mean_abs_diff = np.abs(x[:, None] - x[None, :]).mean()
    assert st.gini(x) == pytest.approx(mean_abs_diff / (2 * x.mean()))


def test_statistics_of_a_hand_made_log():
    log = pd.DataFrame(
        {
            "user": ["u1"] * 4 + ["u2"] * 2,
            "item": ["a", "b", "a", "c", "c", "c"],
            "category": ["x", "y", "x", "z", "z", "z"],
            "time": [1, 1, 2, 3, 5, 5],
        }
    )
    stats = st.behaviour_statistics(log)
    assert stats["users"] == 2 and stats["behaviours"] == 6
    assert stats["length_max"] == 4
    assert stats["same_day_tie_share"] == pytest.approx(4 / 6)
    assert stats["duplicate_share"] == pytest.approx(1 / 6)


def test_reader_accepts_gzip_json_and_python_literal_meta(tmp_path):
    reviews = [
        {"reviewerID": "A1", "asin": "i1", "unixReviewTime": 86400},
        {"reviewerID": "A1", "asin": "i2", "unixReviewTime": 172800},
    ]
    with gzip.open(tmp_path / "reviews.json.gz", "wt") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in reviews))
    (tmp_path / "meta.json").write_text(
        repr({"asin": "i1", "categories": [["Books", "Poetry"], ["Books", "Art"]]}) + "\n"
        + json.dumps({"asin": "i2", "title": "no categories"}) + "\n"
    )
    log = st.read_behaviour_log(tmp_path / "reviews.json.gz", tmp_path / "meta.json")
    assert log["category"].tolist() == ["Poetry", st.NO_CATEGORY]
    assert log["time"].tolist() == [86400, 172800]
