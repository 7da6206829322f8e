"""The sample arithmetic against a direct, loop-based construction."""
import numpy as np
import pytest

from sim_merlin.preprocessing.samples import (
    NegativeSampler,
    build_samples,
    counter_uniform,
    drop_repeated_behaviours,
)


def _random_sequences(rng, users=25, max_len=30, n_items=40):
    lengths = rng.integers(0, max_len, users)
    items = rng.integers(3, n_items, lengths.sum()).astype(np.int32)
    category_of_item = rng.integers(3, 9, n_items).astype(np.int32)
    return lengths, items, category_of_item


@pytest.mark.parametrize("split,min_history", [("train", 1), ("train", 4), ("test", 1)])
def test_positives_and_histories_match_a_direct_construction(split, min_history):
    rng = np.random.default_rng(0)
    lengths, items, cat_of = _random_sequences(rng)
    users = np.arange(100, 100 + len(lengths))
    sampler = NegativeSampler(items, {"category_id": cat_of})
    width = 6
    out = build_samples(users, lengths, {"item_id": items, "category_id": cat_of[items]}, split,
                        width, sampler, seed=3, min_history=min_history)
    expected = []
    start = 0
    for user, n in zip(users, lengths):
        seq = items[start : start + n].tolist()
        start += n
        targets = [n - 1] if split == "test" and n >= 2 else range(min_history, n - 1)
        if split == "test" and n < 2:
            targets = []
        for k in targets:
            history = seq[max(0, k - width) : k]
            expected.append((user, seq[k], [0] * (width - len(history)) + history))
    n_pos = len(expected)
    assert len(out["label"]) == 2 * n_pos
    assert out["label"][:n_pos].tolist() == [1] * n_pos and out["label"][n_pos:].sum() == 0
    got = [
        (users[out["user_row"][i]], out["item_id"][i], out["item_id_history"][i].tolist())
        for i in range(n_pos)
    ]
    assert got == expected
    np.testing.assert_array_equal(out["category_id_history"][:n_pos],
                                  np.where(out["item_id_history"][:n_pos] > 0,
                                           cat_of[out["item_id_history"][:n_pos]], 0))
    # Negatives: same user and history as their positive, target from the pool with its category.
    np.testing.assert_array_equal(out["user_row"][n_pos:], out["user_row"][:n_pos])
    np.testing.assert_array_equal(out["item_id_history"][n_pos:], out["item_id_history"][:n_pos])
    assert set(out["item_id"][n_pos:].tolist()) <= set(items.tolist())
    np.testing.assert_array_equal(out["category_id"][n_pos:], cat_of[out["item_id"][n_pos:]])
    # Negative histories: same padding as the history, pool items, matching categories.
    filled = out["item_id_history"] > 0
    np.testing.assert_array_equal(out["item_id_neg_history"] > 0, filled)
    assert set(out["item_id_neg_history"][filled].tolist()) <= set(items.tolist())
    np.testing.assert_array_equal(out["category_id_neg_history"][filled],
                                  cat_of[out["item_id_neg_history"][filled]])
    assert (out["category_id_neg_history"][~filled] == 0).all()
    for key in ("item_id", "category_id", "item_id_history", "item_id_neg_history"):
        assert out[key].dtype == np.int32, key


def test_negatives_follow_interaction_counts():
    pool = np.repeat(np.array([3, 4, 5, 6]), [1, 2, 3, 14])
    sampler = NegativeSampler(pool, {})
    assert sampler.probabilities() == pytest.approx({3: 0.05, 4: 0.1, 5: 0.15, 6: 0.7})
    draws = sampler.draw(counter_uniform(1, np.arange(200_000)))
    observed = np.bincount(draws, minlength=7)[3:] / len(draws)
    np.testing.assert_allclose(observed, [0.05, 0.1, 0.15, 0.7], atol=0.005)


def test_counter_uniform_is_uniform_and_depends_on_every_key():
    u = counter_uniform(7, np.arange(100_000), 3)
    assert 0.0 <= u.min() and u.max() < 1.0
    assert np.histogram(u, bins=10, range=(0, 1))[0] == pytest.approx([10_000] * 10, rel=0.05)
    assert not np.array_equal(u, counter_uniform(8, np.arange(100_000), 3))
    assert not np.array_equal(u, counter_uniform(7, np.arange(100_000), 4))
    np.testing.assert_array_equal(u, counter_uniform(7, np.arange(100_000), 3))


def test_excluding_positive_negatives_redraws_clashes():
    rng = np.random.default_rng(1)
    lengths = np.full(50, 12)
    items = rng.integers(3, 5, lengths.sum()).astype(np.int32)  # two items: clashes are common
    sampler = NegativeSampler(items, {})
    plain = build_samples(np.arange(50), lengths, {"item_id": items}, "train", 5, sampler, 0)
    n = len(plain["label"]) // 2
    assert (plain["item_id"][n:] == plain["item_id"][:n]).mean() > 0.3
    strict = build_samples(np.arange(50), lengths, {"item_id": items}, "train", 5, sampler, 0,
                           exclude_positive=True)
    assert not (strict["item_id"][n:] == strict["item_id"][:n]).any()


def test_draws_do_not_depend_on_which_users_are_processed_together():
    rng = np.random.default_rng(2)
    lengths, items, cat_of = _random_sequences(rng, users=10)
    sampler = NegativeSampler(items, {"category_id": cat_of})
    users = np.arange(10)
    features = {"item_id": items, "category_id": cat_of[items]}
    whole = build_samples(users, lengths, features, "train", 5, sampler, seed=9)
    split = int(lengths[:4].sum())
    part = build_samples(users[4:], lengths[4:], {k: v[split:] for k, v in features.items()},
                         "train", 5, sampler, seed=9)
    n_whole, n_part = len(whole["label"]) // 2, len(part["label"]) // 2
    np.testing.assert_array_equal(whole["item_id"][n_whole - n_part : n_whole], part["item_id"][:n_part])
    np.testing.assert_array_equal(whole["item_id"][-n_part:], part["item_id"][-n_part:])
    np.testing.assert_array_equal(whole["item_id_neg_history"][-n_part:], part["item_id_neg_history"][-n_part:])


def test_exact_duplicates_are_dropped_per_user():
    lengths = np.array([4, 2])
    item = np.array([5, 5, 6, 6, 6, 6])
    time = np.array([1, 1, 1, 2, 3, 3])
    keep, new_lengths = drop_repeated_behaviours(lengths, item, time)
    assert keep.tolist() == [True, False, True, True, True, False]
    assert new_lengths.tolist() == [3, 1]
