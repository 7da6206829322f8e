"""A realistic synthetic behaviour log, written exactly in the Amazon Reviews 2014 layout.

``python -m sim_merlin.datasets.synthetic --out DIR`` writes ``DIR/reviews_<Name>.json`` and
``DIR/meta_<Name>.json`` the way the real SNAP files look:

* reviews: strict JSON lines with ``reviewerID``, ``asin``, ``reviewerName`` (sometimes absent),
  ``helpful``, ``reviewText``, ``overall``, ``summary``, ``unixReviewTime`` (midnight UTC, so
  timestamps are day-granular and tie often) and ``reviewTime`` (``"MM D, YYYY"``);
* meta: one **Python literal** per line (single quotes, ``repr`` of a dict, as ``meta_Books.json``
  is), with ``categories`` as a list of category paths; a few items have no ``categories`` key and
  a few only the generic path ``[['Books']]``; a few reviews are exact duplicates.

The behaviour has the structure real logs have, so that model quality means something:

* categories have Zipf popularity, and items have Zipf popularity inside their category;
* every user has a few long-term interests (categories with personal weights) and a favourite
  *series* of items inside each;
* behaviour comes in short **episodes** (a few consecutive behaviours in one category, often on the
  same day) grouped into longer **phases** dominated by one interest; when a phase ends, an
  interest that may have been dormant for 50+ behaviours returns, often with the same series, so a
  model that searches the whole history can beat one that only sees the last 10 behaviours;
* some episodes are exploration of a random popular category;
* user history lengths are log-normal (heavy-tailed), with presets for a small default and for the
  full Amazon Books size (about 8M users, 2.37M items, 22.5M reviews, ~106k users with >= 20).

Output is deterministic for a seed: users are generated in fixed blocks, each with its own random
stream, so the files do not depend on memory or chunking. Files are written to a temporary name and
renamed, so an interrupted run never leaves a file that looks complete.

Example::

    >>> import tempfile, json, ast, pathlib
    >>> from sim_merlin.datasets.synthetic import SyntheticConfig, generate
    >>> out = pathlib.Path(tempfile.mkdtemp())
    >>> summary = generate(SyntheticConfig(users=50, items=400, categories=12), out)
    >>> review = json.loads((out / "reviews_Books.json").open().readline())
    >>> sorted(k for k in review if k in ("asin", "reviewerID", "unixReviewTime"))
    ['asin', 'reviewerID', 'unixReviewTime']
    >>> meta = ast.literal_eval((out / "meta_Books.json").open().readline())
    >>> "asin" in meta
    True
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import functools
import gzip
import json
import os
import sys
from pathlib import Path
from typing import Iterator

import numpy as np

#: Users generated per random stream. Part of the output definition: changing it changes the data.
USER_BLOCK = 4096
_ITEM_CHUNK = 65536
_REDRAWS = 4
_DAY = 86400
_FIRST_DAY = (_dt.date(1996, 5, 20) - _dt.date(1970, 1, 1)).days
_LAST_DAY = (_dt.date(2014, 7, 23) - _dt.date(1970, 1, 1)).days


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Every knob of the generator. The defaults make a small data set (about 2 seconds)."""

    users: int = 4000
    items: int = 30000
    categories: int = 150
    seed: int = 12345
    name: str = "Books"
    #: History length per user: round(lognormal(median, sigma)), clipped to [min, max].
    length_median: float = 40.0
    length_sigma: float = 0.8
    length_min: int = 1
    length_max: int = 2000
    #: Long-term interests per user: 1 + Poisson(interests_mean - 1), at most interests_max.
    interests_mean: float = 4.0
    interests_max: int = 8
    #: Mean behaviours per episode and per phase (geometric lengths).
    episode_mean: float = 3.0
    phase_mean: float = 20.0
    #: Share of episodes exploring a random popular category, and of the rest that follow the
    #: phase's dominant interest (the others pick any of the user's interests).
    explore_prob: float = 0.15
    phase_interest_prob: float = 0.75
    #: Probability that an interest behaviour picks from the user's favourite series.
    series_prob: float = 0.4
    series_mean: float = 4.0
    category_zipf: float = 1.0
    item_zipf: float = 0.9
    duplicate_prob: float = 0.004
    missing_categories_prob: float = 0.02
    generic_category_prob: float = 0.02
    extra_path_prob: float = 0.3
    with_brand: bool = False
    compress: bool = False

    def __post_init__(self):
        for field in ("users", "items", "categories", "length_min", "interests_max"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        if self.length_max < self.length_min:
            raise ValueError(
                f"length_max ({self.length_max}) must be >= length_min ({self.length_min})"
            )
        if self.categories > self.items:
            raise ValueError(
                f"categories ({self.categories}) cannot exceed items ({self.items}): "
                "every category needs at least one item"
            )
        for field in (
            "explore_prob",
            "phase_interest_prob",
            "series_prob",
            "duplicate_prob",
            "missing_categories_prob",
            "generic_category_prob",
            "extra_path_prob",
        ):
            value = getattr(self, field)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{field} must be a probability in [0, 1], got {value}")
        for field in ("episode_mean", "phase_mean", "series_mean", "interests_mean"):
            if getattr(self, field) < 1.0:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        if not self.name or any(ch in self.name for ch in "/\\ "):
            raise ValueError(f"name must be a plain word (used in file names), got {self.name!r}")

    @property
    def reviews_filename(self) -> str:
        return f"reviews_{self.name}.json" + (".gz" if self.compress else "")

    @property
    def meta_filename(self) -> str:
        return f"meta_{self.name}.json" + (".gz" if self.compress else "")


#: Presets: ``amazon-books`` matches the size of the 2014 Books files (reviews_Books.json:
#: 22.5M reviews, 8.03M users, 2.37M items; 105,925 users with >= 20 reviews).
PRESETS = {
    "default": {},
    "amazon-books": dict(
        users=8_026_324,
        items=2_370_585,
        categories=2_500,
        length_median=1.1,
        length_sigma=1.3,
        length_max=20_000,
    ),
}


# --------------------------------------------------------------------------------------------
# Catalogue: categories, items, series (shared by all users)
# --------------------------------------------------------------------------------------------

_GENRES = [
    "Literature & Fiction", "Mystery, Thriller & Suspense", "Science Fiction & Fantasy",
    "Romance", "Children's Books", "Teen & Young Adult", "History", "Biographies & Memoirs",
    "Business & Money", "Cookbooks, Food & Wine", "Health, Fitness & Dieting", "Religion & Spirituality",
    "Politics & Social Sciences", "Science & Math", "Computers & Technology", "Arts & Photography",
    "Crafts, Hobbies & Home", "Parenting & Relationships", "Self-Help", "Travel",
    "Sports & Outdoors", "Humor & Entertainment", "Comics & Graphic Novels", "Reference",
    "Law", "Medical Books", "Education & Teaching", "Engineering & Transportation",
]
_LEAF_FIRST = [
    "Women's", "Men's", "Historical", "Contemporary", "Classic", "Epic", "Cozy", "Hard-Boiled",
    "Urban", "Military", "Regional", "Ancient", "Modern", "Applied", "Practical", "Illustrated",
    "Short", "Literary", "Christian", "Jewish", "Buddhist", "Victorian", "Medieval", "American",
    "European", "Asian", "African", "Latin American", "Canadian", "British", "Gothic", "Dark",
    "Paranormal", "Political", "Legal", "Medical", "Culinary", "Psychological", "Domestic",
    "Coming-of-Age", "Teachers'", "Children's", "Family", "Small-Town", "Space", "Alternate",
    "Cyber", "Steam", "Humorous", "Spiritual",
]
_LEAF_SECOND = [
    "Fiction", "Mysteries", "Thrillers", "Romance", "Fantasy", "Sagas", "Poetry", "Essays",
    "Biographies", "Memoirs", "Cooking", "Baking", "Gardening", "Travel", "History", "Science",
    "Programming", "Databases", "Networking", "Finance", "Investing", "Management", "Marketing",
    "Parenting", "Crafts", "Quilting", "Photography", "Painting", "Music", "Drama", "Humor",
    "Westerns", "Horror", "Adventure", "Espionage", "Crime", "Philosophy", "Theology", "Psychology",
    "Nursing", "Law", "Test Prep", "Dictionaries", "Atlases", "Comics", "Manga", "Short Stories",
    "Anthologies", "Diets", "Fitness", "Yoga", "Sports", "Hunting & Fishing", "Pets",
]
_TITLE_WORDS = [
    "Secret", "Garden", "Night", "River", "House", "Storm", "Winter", "Shadow", "Light", "Road",
    "Kingdom", "Heart", "Stone", "Island", "Silence", "Fire", "Summer", "Letters", "Journey",
    "Promise", "Bridge", "Mountain", "Daughter", "Son", "Widow", "Doctor", "Captain", "Baker",
]
_NAMES = [
    "Amazon Customer", "John Smith", "Mary J.", "B. Johnson", "Book Lover", "avid reader",
    "K. Williams", "Linda", "R. Brown \"Bob\"", "Sue O'Neil", "Grandma Reads", "D. Miller",
    "TX Mom", "J. Garcia", "Prof. Lee", "bookworm", "A. Nguyen", "M. Davis", "Reader in Ohio",
]
_SUMMARIES = [
    "Great read!", "Couldn't put it down", "Disappointing", "A classic", "Five stars",
    "Not what I expected", "Loved it", "OK but slow", "Highly recommended", "Meh",
    "Wonderful story", "Good \"beach\" book", "Informative", "Too long", "A must-read",
]
_TEXTS = [
    "I enjoyed this book very much.", "The characters felt real and the plot kept me going.",
    "Slow start, but it's worth finishing.", "Not my cup of tea, although the writing is fine.",
    "Bought it as a gift; she loved it.", "The second half drags.", "Well researched and clear.",
    "I've read everything by this author and this is the best.", "Good value for the price.",
    "Recipes are easy to follow.", "The ending was a \"twist\" I did not see coming.",
]
#: Amazon Books' rating mix (roughly): interest behaviours, then exploration behaviours.
_RATING_P_INTEREST = np.array([0.03, 0.04, 0.09, 0.22, 0.62])
_RATING_P_EXPLORE = np.array([0.08, 0.08, 0.16, 0.26, 0.42])


@dataclasses.dataclass
class Catalogue:
    """Items laid out by category: category ``c`` owns items ``[start[c], start[c] + size[c])``,
    in decreasing popularity. ``item_cdf`` is ``c + cdf_c(rank)``, concatenated, so one
    ``searchsorted(item_cdf, c + u)`` samples a Zipf item inside category ``c``."""

    category_p: np.ndarray  # [C] category popularity
    start: np.ndarray  # [C]
    size: np.ndarray  # [C]
    item_category: np.ndarray  # [M]
    item_cdf: np.ndarray  # [M]
    series_of_item: np.ndarray  # [M]
    series_start: np.ndarray  # [S]
    series_size: np.ndarray  # [S]
    asins: np.ndarray  # [M] of str
    leaf_names: list[str]
    genre_of_category: np.ndarray  # [C]

    def zipf_items(self, categories: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        u = rng.random(len(categories))
        found = np.searchsorted(self.item_cdf, categories + u, side="right")
        return np.minimum(found, self.start[categories] + self.size[categories] - 1)

    def series_items(self, series: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        offset = (rng.random(len(series)) * self.series_size[series]).astype(np.int64)
        return self.series_start[series] + offset

    def categories_by_popularity(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return np.minimum(
            np.searchsorted(np.cumsum(self.category_p), rng.random(n), side="right"),
            len(self.category_p) - 1,
        )


def _zipf_p(n: int, exponent: float) -> np.ndarray:
    p = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** exponent
    return p / p.sum()


_ALNUM = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _base36(values: np.ndarray, width: int, alphabet: str) -> np.ndarray:
    """Fixed-width encoding of non-negative integers in ``len(alphabet)`` symbols."""
    base = len(alphabet)
    symbols = np.frombuffer(alphabet.encode(), dtype="S1")
    digits = np.empty((len(values), width), dtype="S1")
    rest = values.astype(np.uint64).copy()
    for k in range(width - 1, -1, -1):
        digits[:, k] = symbols[(rest % base).astype(np.int64)]
        rest //= base
    return digits.view(f"S{width}").ravel().astype(str)


def _bijective_scramble(index: np.ndarray, modulus: int, multiplier: int) -> np.ndarray:
    """A permutation of [0, modulus) so ids look random; ``multiplier`` must be coprime with
    ``modulus`` (Python integers: no overflow)."""
    return (index.astype(object) * multiplier + modulus * 5 // 7) % modulus


def _asins(n_items: int) -> np.ndarray:
    index = np.arange(n_items)
    isbn_like = _bijective_scramble(index, 10**9, 2_654_435_761).astype(np.int64)
    check = (index * 7 % 11).astype(np.int64)
    check_chars = np.where(check == 10, "X", check.astype(str))
    isbn = np.char.add(np.char.zfill(isbn_like.astype(str), 9), check_chars)
    kindle_ids = _bijective_scramble(index, 36**7, 1_000_003).astype(np.int64)
    kindle = np.char.add("B00", _base36(kindle_ids, 7, _ALNUM))
    # About one item in ten is a Kindle-style ASIN, as in the Books file.
    return np.where(index % 10 == 9, kindle, isbn).astype(str)


def _reviewer_ids(first: int, count: int) -> np.ndarray:
    """Real-looking reviewer ids ("A" + 12 symbols), unique per global user index."""
    scrambled = _bijective_scramble(np.arange(first, first + count), 36**12, 0x9E3779B97F4A7C15)
    return np.char.add("A", _base36(scrambled.astype(np.uint64), 12, _ALNUM))


def _leaf_names(n: int, rng: np.random.Generator) -> list[str]:
    pairs = [f"{a} {b}" for a in _LEAF_FIRST for b in _LEAF_SECOND]
    order = rng.permutation(len(pairs))
    names = [pairs[i] for i in order[:n]]
    extra = n - len(names)
    names += [f"{pairs[i % len(pairs)]} {i // len(pairs) + 2}" for i in range(extra)]
    return names


def build_catalogue(config: SyntheticConfig) -> Catalogue:
    rng = np.random.default_rng([config.seed, 0xCA7])
    n_cat, n_items = config.categories, config.items
    category_p = _zipf_p(n_cat, config.category_zipf)
    # Popular categories hold more items (sub-linearly); every category holds at least one.
    share = category_p**0.8
    size = 1 + np.floor(share / share.sum() * (n_items - n_cat)).astype(np.int64)
    size[0] += n_items - size.sum()
    start = np.concatenate([[0], np.cumsum(size)[:-1]])
    item_category = np.repeat(np.arange(n_cat), size)
    rank = np.arange(n_items) - start[item_category]
    p_rank = 1.0 / (rank + 1.0) ** config.item_zipf
    norm = np.bincount(item_category, weights=p_rank, minlength=n_cat)
    within = np.cumsum(p_rank) - np.repeat(np.cumsum(norm) - norm, size)
    item_cdf = item_category + within / norm[item_category]
    item_cdf[start + size - 1] = np.arange(n_cat) + 1.0  # exact upper end, no round-off gap
    new_series = rng.random(n_items) < 1.0 / config.series_mean
    new_series[start] = True
    series_of_item = np.cumsum(new_series) - 1
    series_start = np.flatnonzero(new_series)
    series_size = np.diff(np.append(series_start, n_items))
    return Catalogue(
        category_p=category_p,
        start=start,
        size=size,
        item_category=item_category,
        item_cdf=item_cdf,
        series_of_item=series_of_item,
        series_start=series_start,
        series_size=series_size,
        asins=_asins(n_items),
        leaf_names=_leaf_names(n_cat, rng),
        genre_of_category=rng.integers(0, len(_GENRES), n_cat),
    )


# --------------------------------------------------------------------------------------------
# Users
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class BehaviourBlock:
    """Behaviours of one block of users, in each user's time order."""

    user: np.ndarray  # [N] global user index
    item: np.ndarray  # [N]
    day: np.ndarray  # [N] days since 1970-01-01
    rating: np.ndarray  # [N] 1..5
    explore: np.ndarray  # [N] bool: exploration behaviour (not one of the user's interests)


def _user_lengths(config: SyntheticConfig, n: int, rng: np.random.Generator) -> np.ndarray:
    raw = np.round(np.exp(rng.normal(np.log(config.length_median), config.length_sigma, n)))
    return np.clip(raw, config.length_min, config.length_max).astype(np.int64)


def _draw_slots(cum_weights: np.ndarray, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    u = rng.random(len(rows))
    slot = (u[:, None] > cum_weights[rows]).sum(axis=1)
    return np.minimum(slot, cum_weights.shape[1] - 1)


def _segment_cumsum(values: np.ndarray, first_of_segment: np.ndarray) -> np.ndarray:
    total = np.cumsum(values)
    segment_base = np.maximum.accumulate(np.where(first_of_segment, total - values, 0))
    return total - segment_base


def generate_block(
    config: SyntheticConfig, catalogue: Catalogue, block: int
) -> BehaviourBlock:
    """Behaviours of users ``[block * USER_BLOCK, ...)``; depends only on (seed, block)."""
    rng = np.random.default_rng([config.seed, block])
    first = block * USER_BLOCK
    n_users = min(USER_BLOCK, config.users - first)
    lengths = _user_lengths(config, n_users, rng)
    n_events = int(lengths.sum())
    event_user = np.repeat(np.arange(n_users), lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    is_first = np.zeros(n_events, dtype=bool)
    is_first[starts] = True

    # Long-term interests: categories by popularity, personal weights, a favourite series each.
    k_max = config.interests_max
    n_interests = np.minimum(1 + rng.poisson(config.interests_mean - 1.0, n_users), k_max)
    interest_cat = catalogue.categories_by_popularity(n_users * k_max, rng).reshape(n_users, k_max)
    weights = rng.gamma(1.0, 1.0, (n_users, k_max)) * (np.arange(k_max) < n_interests[:, None])
    cum_weights = np.cumsum(weights / weights.sum(axis=1, keepdims=True), axis=1)
    favourite = catalogue.series_of_item[catalogue.zipf_items(interest_cat.ravel(), rng)]
    favourite = favourite.reshape(n_users, k_max)

    # Episodes (a few behaviours in one category) grouped into phases (one dominant interest).
    new_episode = (rng.random(n_events) < 1.0 / config.episode_mean) | is_first
    episode = np.cumsum(new_episode) - 1
    episode_user = event_user[new_episode]
    n_episodes = len(episode_user)
    episode_first = np.ones(n_episodes, dtype=bool)
    episode_first[1:] = episode_user[1:] != episode_user[:-1]
    new_phase = (rng.random(n_episodes) < config.episode_mean / config.phase_mean) | episode_first
    phase = np.cumsum(new_phase) - 1
    phase_slot = _draw_slots(cum_weights, episode_user[new_phase], rng)
    r = rng.random(n_episodes)
    explore = r < config.explore_prob
    follow_phase = r < config.explore_prob + (1 - config.explore_prob) * config.phase_interest_prob
    slot = np.where(follow_phase, phase_slot[phase], _draw_slots(cum_weights, episode_user, rng))
    episode_cat = np.where(
        explore,
        catalogue.categories_by_popularity(n_episodes, rng),
        interest_cat[episode_user, slot],
    )

    # Items: the favourite series of the interest, or a popular item of the category.
    event_explore = explore[episode]
    use_series = ~event_explore & (rng.random(n_events) < config.series_prob)
    event_cat = episode_cat[episode]
    item = catalogue.zipf_items(event_cat, rng)
    series = favourite[event_user[use_series], slot[episode][use_series]]
    item[use_series] = catalogue.series_items(series, rng)
    # People review a book once: redraw repeats from the category, drop the few left.
    for _ in range(_REDRAWS):
        repeat = _repeated(event_user, item)
        if not repeat.any():
            break
        item[repeat] = catalogue.zipf_items(event_cat[repeat], rng)
    keep = ~_repeated(event_user, item)

    # Days: same-day bursts inside an episode, longer gaps between episodes; recent-heavy starts.
    within_gap = np.where(rng.random(n_events) < 0.4, 0, rng.geometric(1 / 2.5, n_events))
    gap = np.where(new_episode, rng.geometric(1 / 14.0, n_events), within_gap)
    gap[is_first] = 0
    offset = _segment_cumsum(gap, is_first)
    span = offset[starts + lengths - 1]
    window = _LAST_DAY - _FIRST_DAY
    squeeze = np.minimum(1.0, window / np.maximum(span, 1))
    offset = np.floor(offset * squeeze[event_user]).astype(np.int64)
    span = np.floor(span * squeeze).astype(np.int64)
    start_day = _LAST_DAY - span - np.floor(rng.exponential(900.0, n_users)).astype(np.int64)
    start_day = np.maximum(start_day, _FIRST_DAY)
    day = start_day[event_user] + offset

    rating = np.where(
        event_explore,
        rng.choice(5, n_events, p=_RATING_P_EXPLORE),
        rng.choice(5, n_events, p=_RATING_P_INTEREST),
    ) + 1
    return BehaviourBlock(
        user=event_user[keep] + first,
        item=item[keep],
        day=day[keep],
        rating=rating[keep],
        explore=event_explore[keep],
    )


def _repeated(user: np.ndarray, item: np.ndarray) -> np.ndarray:
    """True where (user, item) already occurred earlier in the block."""
    key = user.astype(np.int64) * (int(item.max()) + 1) + item
    _, first = np.unique(key, return_index=True)
    repeat = np.ones(len(key), dtype=bool)
    repeat[first] = False
    return repeat


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _json_strings(values: list[str]) -> list[str]:
    return [json.dumps(v) for v in values]


@functools.lru_cache(maxsize=1)
def _review_time_by_day() -> np.ndarray:
    """``reviewTime`` strings ("MM D, YYYY": month zero-padded, day not) for every day the
    generator can produce, indexed by ``day - _FIRST_DAY``."""
    dates = (_dt.date(1970, 1, 1) + _dt.timedelta(days=d) for d in range(_FIRST_DAY, _LAST_DAY + 1))
    return np.array([f"{d.month:02d} {d.day}, {d.year}" for d in dates])


def review_lines(
    config: SyntheticConfig, catalogue: Catalogue, block: BehaviourBlock, block_index: int
) -> Iterator[str]:
    """JSON lines of one block, ordered by item (the real files are grouped by product)."""
    rng = np.random.default_rng([config.seed, block_index, 0x7E7])
    n = len(block.item)
    copies = 1 + (rng.random(n) < config.duplicate_prob)
    order = np.argsort(block.item, kind="stable")
    order = np.repeat(order, copies[order])
    first_user = int(block.user.min()) if n else 0
    n_block_users = int(block.user.max()) - first_user + 1 if n else 0
    reviewer_ids = _reviewer_ids(first_user, n_block_users)
    names = _json_strings(_NAMES)
    user_name = rng.integers(0, len(names), n_block_users)
    user_anonymous = rng.random(n_block_users) < 0.05
    summaries = _json_strings(_SUMMARIES)
    texts = _json_strings(_TEXTS)
    summary = rng.integers(0, len(summaries), n)
    text = rng.integers(0, len(texts), n)
    votes = np.minimum(rng.geometric(0.55, n) - 1, 500)
    helpful_yes = np.floor(votes * rng.random(n) ** 0.5).astype(np.int64)
    review_time = _review_time_by_day()[block.day - _FIRST_DAY]
    asins = catalogue.asins
    for i in order.tolist():
        local_user = int(block.user[i]) - first_user
        name = "" if user_anonymous[local_user] else (
            f'"reviewerName": {names[user_name[local_user]]}, '
        )
        yield (
            f'{{"reviewerID": "{reviewer_ids[local_user]}", "asin": "{asins[block.item[i]]}", '
            f'{name}"helpful": [{helpful_yes[i]}, {votes[i]}], '
            f'"reviewText": {texts[text[i]]}, "overall": {block.rating[i]}.0, '
            f'"summary": {summaries[summary[i]]}, "unixReviewTime": {int(block.day[i]) * _DAY}, '
            f'"reviewTime": "{review_time[i]}"}}\n'
        )


def meta_lines(config: SyntheticConfig, catalogue: Catalogue) -> Iterator[str]:
    """Python-literal lines (``repr`` of a dict), one per item, in a shuffled order."""
    rng = np.random.default_rng([config.seed, 0x3E7A])
    n_items = config.items
    order = rng.permutation(n_items)
    missing = rng.random(n_items) < config.missing_categories_prob
    generic = rng.random(n_items) < config.generic_category_prob
    extra_path = rng.random(n_items) < config.extra_path_prob
    extra_category = rng.integers(0, config.categories, n_items)
    has_price = rng.random(n_items) < 0.8
    price = np.round(rng.lognormal(2.4, 0.6, n_items), 2)
    title_a = rng.integers(0, len(_TITLE_WORDS), n_items)
    title_b = rng.integers(0, len(_TITLE_WORDS), n_items)
    title_form = rng.integers(0, 4, n_items)
    popularity_rank = np.empty(n_items, dtype=np.int64)
    item_p = catalogue.category_p[catalogue.item_category] / (
        np.arange(n_items) - catalogue.start[catalogue.item_category] + 1.0
    ) ** config.item_zipf
    popularity_rank[np.argsort(-item_p, kind="stable")] = np.arange(1, n_items + 1)
    sales_rank = popularity_rank * 3 + rng.integers(0, 3, n_items)
    leaf, genre_of = catalogue.leaf_names, catalogue.genre_of_category
    for i in order.tolist():
        a, b = _TITLE_WORDS[title_a[i]], _TITLE_WORDS[title_b[i]]
        title = (
            f"The {a} of the {b}",
            f"A {b}'s {a}",
            f'"{a}": A {b} Story',
            f"{a} & {b} (Book {i % 9 + 1})",
        )[title_form[i]]
        record = {"asin": str(catalogue.asins[i]), "title": title}
        if has_price[i]:
            record["price"] = float(price[i])
        record["imUrl"] = f"http://ecx.images-amazon.com/images/I/{catalogue.asins[i]}.jpg"
        record["salesRank"] = {"Books": int(sales_rank[i])}
        if config.with_brand:
            record["brand"] = f"Publisher {catalogue.series_of_item[i] % 997}"
        if not missing[i]:
            c = int(catalogue.item_category[i])
            if generic[i]:
                paths = [["Books"]]
            else:
                paths = [["Books", _GENRES[genre_of[c]], leaf[c]]]
            if extra_path[i]:
                e = int(extra_category[i])
                paths.append(["Books", _GENRES[genre_of[e]], leaf[e]])
            record["categories"] = paths
        yield repr(record) + "\n"


class _AtomicText:
    """A text file written under a temporary name and renamed into place on success."""

    def __init__(self, path: Path, compress: bool):
        self.path = path
        self.tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
        self.compress = compress

    def __enter__(self):
        raw = open(self.tmp, "wb")
        self._raw = raw
        if self.compress:
            # mtime=0 keeps compressed output byte-identical across runs.
            self.handle = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="")
        else:
            self.handle = raw
        return self

    def write(self, lines: list[str]) -> None:
        self.handle.write("".join(lines).encode("utf-8"))

    def __exit__(self, exc_type, exc, tb):
        if self.compress:
            self.handle.close()
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)
        return False


def _progress(total: int, unit: str, description: str):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is in the lock; this only guards bare installs
        return None
    # Shown on a terminal, and in logs too when the job is long enough to need it.
    disable = None if total < 200_000 else False
    return tqdm(total=total, unit=unit, desc=description, disable=disable, mininterval=2.0,
                unit_scale=True, file=sys.stderr)


def generate(config: SyntheticConfig, out_dir: str | os.PathLike, overwrite: bool = True) -> dict:
    """Write the reviews and meta files of ``config`` into ``out_dir``; return a summary dict."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    targets = [out / config.reviews_filename, out / config.meta_filename]
    if not overwrite:
        existing = [str(p) for p in targets if p.exists()]
        if existing:
            raise FileExistsError(
                f"refusing to overwrite existing file(s): {', '.join(existing)} "
                "(pass --overwrite to replace them)"
            )
    catalogue = build_catalogue(config)
    n_blocks = -(-config.users // USER_BLOCK)
    reviews = 0
    users_20 = 0
    bar = _progress(config.users, "user", f"reviews_{config.name}")
    with _AtomicText(targets[0], config.compress) as sink:
        for b in range(n_blocks):
            block = generate_block(config, catalogue, b)
            lines = list(review_lines(config, catalogue, block, b))
            sink.write(lines)
            reviews += len(lines)
            users_20 += int((np.bincount(block.user - block.user.min()) >= 20).sum())
            if bar is not None:
                bar.update(min(USER_BLOCK, config.users - b * USER_BLOCK))
    if bar is not None:
        bar.close()
    with _AtomicText(targets[1], config.compress) as sink:
        chunk: list[str] = []
        for line in meta_lines(config, catalogue):
            chunk.append(line)
            if len(chunk) == _ITEM_CHUNK:
                sink.write(chunk)
                chunk = []
        sink.write(chunk)
    summary = {
        "config": dataclasses.asdict(config),
        "reviews_file": str(targets[0]),
        "meta_file": str(targets[1]),
        "review_lines": reviews,
        "users": config.users,
        "users_with_at_least_20_behaviours": users_20,
        "items": config.items,
        "categories": config.categories,
    }
    return summary


def _parse_args(argv=None) -> tuple[SyntheticConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        prog="python -m sim_merlin.datasets.synthetic",
        description=(
            "Write a realistic synthetic behaviour log as reviews_<Name>.json and meta_<Name>.json "
            "in the Amazon Reviews 2014 layout."
        ),
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="size preset; explicit options below override it")
    defaults = SyntheticConfig()
    for field in dataclasses.fields(SyntheticConfig):
        flag = "--" + field.name.replace("_", "-")
        if field.type in ("bool", bool):
            parser.add_argument(flag, dest=field.name, action="store_true", default=None)
        else:
            kind = {"int": int, "float": float, "str": str}[str(field.type)]
            parser.add_argument(flag, dest=field.name, type=kind, default=None,
                                help=f"default {getattr(defaults, field.name)}")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing output files (default: refuse)")
    args = parser.parse_args(argv)
    values = dict(PRESETS[args.preset])
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(SyntheticConfig)
                   if getattr(args, f.name) is not None})
    try:
        config = SyntheticConfig(**values)
    except ValueError as err:
        parser.error(str(err))
    return config, args


def main(argv=None) -> int:
    config, args = _parse_args(argv)
    try:
        summary = generate(config, args.out, overwrite=args.overwrite)
    except FileExistsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"wrote {summary['review_lines']:,} reviews of {summary['users']:,} users "
        f"({summary['users_with_at_least_20_behaviours']:,} with >= 20) over "
        f"{summary['items']:,} items in {summary['categories']:,} categories:\n"
        f"  {summary['reviews_file']}\n  {summary['meta_file']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
