import ast
import dataclasses
import datetime as dt
import gzip
import hashlib
import json
import re

import numpy as np
import pytest

from sim_merlin.datasets import synthetic
from sim_merlin.datasets.statistics import behaviour_statistics, read_behaviour_log
from sim_merlin.datasets.synthetic import PRESETS, USER_BLOCK, SyntheticConfig, generate

SMALL = SyntheticConfig(users=300, items=3000, categories=30, seed=7)


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("small")
    summary = generate(SMALL, out)
    return out, summary


@pytest.fixture(scope="module")
def default_stats(tmp_path_factory):
    out = tmp_path_factory.mktemp("default")
    generate(SyntheticConfig(), out)
    log = read_behaviour_log(out / "reviews_Books.json", out / "meta_Books.json")
    return behaviour_statistics(log)


def test_reviews_are_strict_json_lines_in_the_amazon_layout(small):
    out, summary = small
    lines = (out / "reviews_Books.json").read_text().splitlines()
    assert len(lines) == summary["review_lines"] > 300 * 10
    anonymous = 0
    for line in lines:
        review = json.loads(line)
        assert re.fullmatch(r"A[0-9A-Z]{12}", review["reviewerID"])
        assert re.fullmatch(r"[0-9]{9}[0-9X]|B00[0-9A-Z]{7}", review["asin"])
        assert review["overall"] in (1.0, 2.0, 3.0, 4.0, 5.0)
        assert isinstance(review["unixReviewTime"], int)
        assert review["unixReviewTime"] % 86400 == 0  # day-granular, midnight UTC
        date = dt.datetime.fromtimestamp(review["unixReviewTime"], dt.timezone.utc).date()
        assert review["reviewTime"] == f"{date.month:02d} {date.day}, {date.year}"
        assert dt.date(1996, 5, 20) <= date <= dt.date(2014, 7, 23)
        helpful_yes, helpful_total = review["helpful"]
        assert 0 <= helpful_yes <= helpful_total
        assert isinstance(review["reviewText"], str) and isinstance(review["summary"], str)
        anonymous += "reviewerName" not in review
    assert 0 < anonymous < len(lines) * 0.2


def test_meta_lines_are_python_literals_with_category_paths(small):
    out, _ = small
    lines = (out / "meta_Books.json").read_text().splitlines()
    assert len(lines) == SMALL.items
    records = [ast.literal_eval(line) for line in lines]
    not_json = 0
    for line in lines:
        try:
            json.loads(line)
        except json.JSONDecodeError:
            not_json += 1
    assert not_json == len(lines)  # single quotes everywhere, as in meta_Books.json
    asins = [r["asin"] for r in records]
    assert len(set(asins)) == len(asins)
    with_categories = [r for r in records if "categories" in r]
    missing = len(records) - len(with_categories)
    assert 0 < missing < 0.06 * len(records)
    generic = sum(r["categories"] == [["Books"]] for r in with_categories)
    assert 0 < generic < 0.06 * len(records)
    multi_path = sum(len(r["categories"]) > 1 for r in with_categories)
    assert multi_path > 0.1 * len(records)
    for record in with_categories:
        paths = record["categories"]
        assert all(isinstance(p, list) and p and all(isinstance(x, str) for x in p) for p in paths)
    # Titles with quotes exercise both quoting styles of Python literals.
    assert any(line.count('"') >= 2 and "'title'" in line for line in lines)
    leaves = {r["categories"][0][-1] for r in with_categories}
    assert len(leaves) >= SMALL.categories * 0.8


def test_every_reviewed_item_has_a_meta_line_and_duplicates_and_ties_exist(small):
    out, _ = small
    review_lines = (out / "reviews_Books.json").read_text().splitlines()
    meta = {ast.literal_eval(line)["asin"] for line in (out / "meta_Books.json").open()}
    reviews = [json.loads(line) for line in review_lines]
    assert {r["asin"] for r in reviews} <= meta
    assert len(review_lines) > len(set(review_lines))  # exact duplicate reviews
    user_days = [(r["reviewerID"], r["unixReviewTime"]) for r in reviews]
    assert len(user_days) - len(set(user_days)) > 0.1 * len(reviews)  # same-day ties


def test_same_seed_same_bytes_and_other_seed_other_data(tmp_path):
    first, second, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate(SMALL, first)
    generate(SMALL, second)
    generate(dataclasses.replace(SMALL, seed=8), other)
    for name in ("reviews_Books.json", "meta_Books.json"):
        assert _sha(first / name) == _sha(second / name)
        assert _sha(first / name) != _sha(other / name)


def test_gzip_output_is_deterministic_and_holds_the_same_lines(tmp_path, small):
    out, _ = small
    zipped = dataclasses.replace(SMALL, compress=True)
    generate(zipped, tmp_path / "a")
    generate(zipped, tmp_path / "b")
    for name in ("reviews_Books.json.gz", "meta_Books.json.gz"):
        assert _sha(tmp_path / "a" / name) == _sha(tmp_path / "b" / name)
        plain = (out / name[: -len(".gz")]).read_bytes()
        assert gzip.decompress((tmp_path / "a" / name).read_bytes()) == plain


def test_users_are_generated_in_independent_blocks(tmp_path):
    """Adding users appends data; it never changes the users already there (streamable)."""
    base = SyntheticConfig(users=USER_BLOCK, items=2000, categories=20, seed=3)
    generate(base, tmp_path / "one")
    generate(dataclasses.replace(base, users=USER_BLOCK + 100), tmp_path / "more")
    one = (tmp_path / "one" / "reviews_Books.json").read_text()
    more = (tmp_path / "more" / "reviews_Books.json").read_text()
    assert more.startswith(one) and len(more) > len(one)


def test_user_lengths_follow_the_configured_distribution(default_stats):
    stats = default_stats
    assert 30 <= stats["length_median"] <= 50  # lognormal median 40
    assert 45 <= stats["length_mean"] <= 70
    assert stats["length_p99"] / stats["length_median"] > 4  # heavy tail
    assert 0.7 <= stats["users_ge_20"] <= 0.92  # some users fall under the >= 20 filter


def test_item_popularity_is_skewed(default_stats):
    assert default_stats["item_gini"] > 0.45
    assert default_stats["top1pct_item_share"] > 0.1
    assert 0.1 < default_stats["category_top1_share"] < 0.4


def test_long_range_recurrence_is_present(default_stats):
    stats = default_stats
    # Interests come back after 50+ behaviours of dormancy.
    assert stats["return_after_gap"] > 0.01
    # When the target's category is absent from the last 10 behaviours, the long history still
    # holds it far more often for real targets than for popularity-sampled (negative) ones.
    assert (
        stats["long_given_not_short_positive"] - stats["long_given_not_short_popularity"] > 0.15
    )


def test_without_interests_and_episodes_the_recurrence_statistics_vanish(tmp_path):
    """The statistics above measure the generator's structure, not an artefact: with a single
    interest, no exploration and every item categorised, each behaviour repeats the previous
    category."""
    flat = SyntheticConfig(
        users=400, items=3000, categories=30, interests_max=1, explore_prob=0.0,
        missing_categories_prob=0.0, generic_category_prob=0.0,
    )
    generate(flat, tmp_path)
    stats = behaviour_statistics(
        read_behaviour_log(tmp_path / "reviews_Books.json", tmp_path / "meta_Books.json")
    )
    assert stats["return_after_gap"] < 0.002
    assert stats["long_only_positive"] < 0.002


def test_amazon_books_preset_matches_the_published_sizes():
    config = SyntheticConfig(**PRESETS["amazon-books"])
    lengths = synthetic._user_lengths(config, 1_000_000, np.random.default_rng(1))
    # reviews_Books.json: 22.5M reviews of 8.03M users (2.80 each), 105,925 users with >= 20.
    assert lengths.mean() == pytest.approx(22_507_155 / 8_026_324, rel=0.05)
    assert (lengths >= 20).mean() == pytest.approx(105_925 / 8_026_324, rel=0.1)
    assert config.items == 2_370_585


def test_catalogue_samples_zipf_items_inside_their_category():
    config = SyntheticConfig(items=500, categories=5)
    catalogue = synthetic.build_catalogue(config)
    assert catalogue.size.sum() == 500 and catalogue.size.min() >= 1
    rng = np.random.default_rng(0)
    cats = np.full(200_000, 2)
    items = catalogue.zipf_items(cats, rng)
    assert (catalogue.item_category[items] == 2).all()
    ranks = items - catalogue.start[2]
    observed = np.bincount(ranks, minlength=catalogue.size[2]) / len(items)
    expected = 1.0 / np.arange(1, catalogue.size[2] + 1) ** config.item_zipf
    np.testing.assert_allclose(observed[:5], (expected / expected.sum())[:5], rtol=0.05)


def test_cli_writes_refuses_to_overwrite_and_rejects_bad_options(tmp_path, capsys):
    args = ["--out", str(tmp_path), "--users", "40", "--items", "300", "--categories", "6"]
    assert synthetic.main(args) == 0
    assert "wrote" in capsys.readouterr().out
    before = _sha(tmp_path / "reviews_Books.json")
    assert synthetic.main(args + ["--seed", "99"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _sha(tmp_path / "reviews_Books.json") == before
    assert synthetic.main(args + ["--seed", "99", "--overwrite"]) == 0
    assert _sha(tmp_path / "reviews_Books.json") != before
    with pytest.raises(SystemExit) as exit_info:
        synthetic.main(["--out", str(tmp_path), "--users", "0"])
    assert exit_info.value.code == 2
    assert "users must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        synthetic.main(["--out", str(tmp_path), "--items", "5", "--categories", "10"])
    assert "cannot exceed items" in capsys.readouterr().err


def test_an_interrupted_run_leaves_no_complete_looking_file(tmp_path, monkeypatch):
    generate(SMALL, tmp_path)
    before = _sha(tmp_path / "reviews_Books.json")

    def failing_lines(*args, **kwargs):
        yield '{"partial": true}\n'
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "review_lines", failing_lines)
    with pytest.raises(KeyboardInterrupt):
        generate(dataclasses.replace(SMALL, seed=99), tmp_path)
    assert _sha(tmp_path / "reviews_Books.json") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta_Books.json", "reviews_Books.json"]
