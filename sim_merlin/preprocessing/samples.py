"""Training and test samples from per-user behaviour sequences: targets, histories, negatives.

Given each user's behaviours in time order (item features as parallel lists), a sample is a target
behaviour with the behaviours before it as history:

* **test**: the user's last behaviour, with all earlier ones as history (one per user);
* **train**: every earlier position with at least one prior behaviour (positions 2 .. n-1 of n),
  so a user with n behaviours gives n - 2 positive training samples.

Every positive gets one negative with the same user and history, whose target is drawn from the
interaction-weighted item pool (an item with 10 interactions is 10 times as likely as one with 1)
together with that item's features. Every sample, positive or negative, also gets a **negative
history** of the same length drawn from the same pool (used by DIEN's auxiliary loss).

Histories keep the most recent ``max_length`` behaviours and are **left-padded** with 0 to exactly
``max_length``: the newest behaviour is always the last element, index ``max_length - 1``.

Random draws are a pure function of ``(seed, user id, target position, slot)`` (a counter-based
hash, not a stateful generator), so the output does not depend on partitioning, worker count or
processing order.

Example::

    >>> import numpy as np
    >>> sampler = NegativeSampler(np.array([0, 0, 0, 5, 5]), {"category_id": np.arange(5)})
    >>> out = build_samples(np.array([7]), np.array([4]),
    ...                     {"item_id": np.array([3, 4, 3, 4]), "category_id": np.array([3, 4, 3, 4])},
    ...                     "train", max_length=3, sampler=sampler, seed=1)
    >>> out["label"].tolist(), out["item_id_history"].tolist()
    ([1, 1, 0, 0], [[0, 0, 3], [0, 3, 4], [0, 0, 3], [0, 3, 4]])
"""
from __future__ import annotations

import numpy as np

from sim_merlin.schema import HISTORY_SUFFIX, NEGATIVE_HISTORY_SUFFIX
_STREAM_TARGET = 0x5157
_STREAM_HISTORY = 0xA11C
_MAX_REDRAWS = 32


def counter_uniform(seed: int, *keys: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) floats that depend only on (seed, keys), element-wise (splitmix64 mixing)."""
    with np.errstate(over="ignore"):
        state = np.full(np.broadcast(*keys).shape, np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15))
        for key in keys:
            state = state ^ np.asarray(key).astype(np.uint64)
            state = state + np.uint64(0x9E3779B97F4A7C15)
            state = (state ^ (state >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            state = (state ^ (state >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            state = state ^ (state >> np.uint64(31))
    return (state >> np.uint64(11)).astype(np.float64) / float(2**53)


class NegativeSampler:
    """Draws item ids in proportion to their number of interactions, with their features.

    ``interactions``: item id of every interaction (the pool); ``item_features``: feature name ->
    array indexed by item id (e.g. the category id of every item id).
    """

    def __init__(self, interactions: np.ndarray, item_features: dict[str, np.ndarray]):
        counts = np.bincount(np.asarray(interactions, dtype=np.int64))
        self.items = np.flatnonzero(counts)
        if len(self.items) == 0:
            raise ValueError("the negative-sampling pool is empty (no interactions left)")
        self.cumulative = np.cumsum(counts[self.items]).astype(np.float64)
        self.item_features = {k: np.asarray(v) for k, v in item_features.items()}

    def draw(self, uniform: np.ndarray) -> np.ndarray:
        position = np.searchsorted(self.cumulative, uniform * self.cumulative[-1], side="right")
        return self.items[np.minimum(position, len(self.items) - 1)]

    def features_of(self, items: np.ndarray) -> dict[str, np.ndarray]:
        return {name: table[items] for name, table in self.item_features.items()}

    def probabilities(self) -> dict[int, float]:
        """Item id -> sampling probability (for tests and documentation)."""
        weights = np.diff(np.concatenate([[0.0], self.cumulative]))
        return dict(zip(self.items.tolist(), (weights / weights.sum()).tolist()))


def _positions(lengths: np.ndarray, split: str, min_history: int = 1):
    """(row -> user index, row -> target position inside the user's sequence).

    test: the last position of every user with at least one earlier behaviour; train: positions
    ``min_history .. n - 2``."""
    if split == "test":
        users = np.flatnonzero(lengths >= 2)
        return users, lengths[users] - 1
    if split != "train":
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    per_user = np.maximum(lengths - 1 - min_history, 0)
    users = np.repeat(np.arange(len(lengths)), per_user)
    first_row = np.cumsum(per_user) - per_user
    position = np.arange(len(users)) - first_row[users] + min_history
    return users, position


def _left_padded(flat: np.ndarray, start: np.ndarray, length: np.ndarray, width: int) -> np.ndarray:
    """[rows, width] with ``flat[start:start+length]`` right-aligned, zeros on the left."""
    slot = np.arange(width)
    offset = slot[None, :] - (width - length[:, None])
    valid = offset >= 0
    out = np.zeros((len(start), width), dtype=flat.dtype)
    out[valid] = flat[(start[:, None] + offset)[valid]]
    return out


def build_samples(
    user: np.ndarray,
    lengths: np.ndarray,
    features: dict[str, np.ndarray],
    split: str,
    max_length: int,
    sampler: NegativeSampler,
    seed: int,
    exclude_positive: bool = False,
    min_history: int = 1,
) -> dict[str, np.ndarray]:
    """Samples (positives then negatives) from users' flattened behaviour sequences.

    ``user``: [U] user ids; ``lengths``: [U] behaviours per user; ``features``: item feature name
    -> [sum(lengths)] values, each user's behaviours contiguous and in time order (the first
    feature is the item id). Returns ``label``, ``user_id`` index into ``user`` as ``user_row``,
    target features ``<name>``, and ``<name>_history`` / ``<name>_neg_history`` of shape
    [rows, max_length]. Training targets need at least ``min_history`` earlier behaviours.
    """
    names = list(features)
    item_name = names[0]
    lengths = np.asarray(lengths, dtype=np.int64)
    user_start = np.cumsum(lengths) - lengths
    row_user, position = _positions(lengths, split, min_history)
    target_index = user_start[row_user] + position
    history_length = np.minimum(position, max_length)
    history_start = target_index - history_length
    user_key = np.asarray(user, dtype=np.int64)[row_user]

    out: dict[str, np.ndarray] = {}
    n = len(row_user)
    out["label"] = np.concatenate([np.ones(n, np.int8), np.zeros(n, np.int8)])
    out["user_row"] = np.concatenate([row_user, row_user])
    # Negative targets: one per positive, same user and history, redrawn if asked to avoid the
    # positive item (the reference does not).
    negative = sampler.draw(counter_uniform(seed, user_key, position, _STREAM_TARGET, 0))
    if exclude_positive:
        positive_items = features[item_name][target_index]
        for attempt in range(1, _MAX_REDRAWS + 1):
            clash = np.flatnonzero(negative == positive_items)
            if len(clash) == 0:
                break
            negative[clash] = sampler.draw(
                counter_uniform(seed, user_key[clash], position[clash], _STREAM_TARGET, attempt)
            )
    negative_features = sampler.features_of(negative)
    negative_features[item_name] = negative
    for name in names:
        values = features[name]
        out[name] = np.concatenate(
            [values[target_index], negative_features[name].astype(values.dtype)]
        )
    for name in names:
        history = _left_padded(features[name], history_start, history_length, max_length)
        out[name + HISTORY_SUFFIX] = np.concatenate([history, history])
    # Negative histories: an independent pool draw per slot, for positive and negative rows,
    # with the positive history's padding.
    slot = np.arange(max_length)
    label_key = out["label"].astype(np.int64)
    uniform = counter_uniform(
        seed,
        np.concatenate([user_key, user_key])[:, None],
        np.concatenate([position, position])[:, None],
        label_key[:, None],
        _STREAM_HISTORY,
        slot[None, :],
    )
    drawn = sampler.draw(uniform.ravel()).reshape(uniform.shape)
    filled = slot[None, :] >= (max_length - np.concatenate([history_length, history_length]))[:, None]
    drawn_features = sampler.features_of(drawn.ravel())
    drawn_features[item_name] = drawn.ravel()
    for name in names:
        values = drawn_features[name].reshape(drawn.shape).astype(features[name].dtype)
        out[name + NEGATIVE_HISTORY_SUFFIX] = np.where(filled, values, 0)
    return out


def drop_repeated_behaviours(
    user_lengths: np.ndarray, item: np.ndarray, time: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Exact duplicate reviews (same user, item and time; adjacent after sorting by time, item):
    returns (mask of behaviours to keep, new lengths)."""
    owner = np.repeat(np.arange(len(user_lengths)), user_lengths)
    repeat = np.zeros(len(item), dtype=bool)
    repeat[1:] = (item[1:] == item[:-1]) & (time[1:] == time[:-1]) & (owner[1:] == owner[:-1])
    keep = ~repeat
    return keep, np.bincount(owner[keep], minlength=len(user_lengths))
