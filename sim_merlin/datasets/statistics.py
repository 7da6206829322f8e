"""Statistics of a behaviour log: what makes it realistic, and whether long histories matter.

Used to check the synthetic generator against what real logs show (``python -m
sim_merlin.datasets.statistics --reviews R --meta M`` prints them for any Amazon-layout files) and
by the tests. The reader here is a plain, slow, obviously-correct one; the training data is made
by ``workflows/preprocess.py``.

Example::

    >>> import pandas as pd
    >>> log = pd.DataFrame({"user": [0, 0, 0, 1, 1], "item": [1, 2, 1, 3, 3],
    ...                     "category": [5, 6, 5, 7, 7], "time": [1, 1, 2, 5, 6]})
    >>> behaviour_statistics(log)["users"]
    2
"""
from __future__ import annotations

import argparse
import ast
import gzip
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from sim_merlin.preprocessing.raw import NO_CATEGORY


def _open_text(path: str | Path):
    path = Path(path)
    with open(path, "rb") as probe:
        gzipped = probe.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rt", encoding="utf-8") if gzipped else open(path, encoding="utf-8")


def read_meta_categories(meta_path: str | Path) -> dict[str, str]:
    """asin -> category (last element of the first category path) from a meta file."""
    categories = {}
    with _open_text(meta_path) as lines:
        for line in lines:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = ast.literal_eval(line)
            paths = record.get("categories") or [[]]
            categories[record["asin"]] = paths[0][-1] if paths[0] else NO_CATEGORY
    return categories


def read_behaviour_log(reviews_path: str | Path, meta_path: str | Path | None = None) -> pd.DataFrame:
    """Reviews (and meta) as a frame with columns user, item, category, time (unix seconds)."""
    users, items, times = [], [], []
    with _open_text(reviews_path) as lines:
        for line in lines:
            if not line.strip():
                continue
            record = json.loads(line)
            users.append(record["reviewerID"])
            items.append(record["asin"])
            times.append(int(record["unixReviewTime"]))
    log = pd.DataFrame({"user": users, "item": items, "time": np.asarray(times, dtype=np.int64)})
    if meta_path is not None:
        categories = read_meta_categories(meta_path)
        log["category"] = log["item"].map(categories).fillna(NO_CATEGORY)
    return log


def gini(counts: np.ndarray) -> float:
    """Gini coefficient of non-negative counts (0 = all equal, ->1 = concentrated)."""
    x = np.sort(np.asarray(counts, dtype=np.float64))
    n = len(x)
    if n == 0 or x.sum() == 0:
        return 0.0
    return float((2 * np.arange(1, n + 1) - n - 1).dot(x) / (n * x.sum()))


def _previous_distance(user: np.ndarray, key: np.ndarray) -> np.ndarray:
    """For each row (rows grouped by user in time order): how many behaviours back the same key
    last occurred in the same user's history (0 when never)."""
    position = np.arange(len(user)) - np.searchsorted(user, user, side="left")
    frame = pd.DataFrame({"user": user, "key": key, "position": position})
    previous = frame.groupby(["user", "key"], sort=False)["position"].shift(1)
    return np.where(previous.isna(), 0, position - previous.fillna(0)).astype(np.int64)


def _share(mask: np.ndarray) -> float:
    return float(mask.mean()) if len(mask) else 0.0


def behaviour_statistics(
    log: pd.DataFrame, short: int = 10, long: int = 100, gap: int = 50, seed: int = 0
) -> dict:
    """Realism and long-range structure of a log with columns user, item, time (and category).

    Returns a flat dict. Keys about recurrence (need ``category``):

    * ``return_after_gap``: share of behaviours (with >= ``gap`` + 10 predecessors) whose category
      last occurred ``gap`` or more behaviours earlier: an interest coming back after dormancy;
    * ``long_only_positive``: share of behaviours whose category is absent from the last ``short``
      behaviours but present in the ``long`` before them (what only a long-history search finds);
    * ``long_only_popularity``: the same for a category drawn by popularity from all behaviours
      (how negatives are sampled);
    * ``long_given_not_short_{positive,popularity}``: among targets whose category is not in the
      last ``short`` behaviours, the share found in the long history. Their difference is what a
      model that searches the long history can use and a last-``short`` model cannot.
    """
    log = log.sort_values(["user", "time", "item"], kind="stable").reset_index(drop=True)
    user = pd.factorize(log["user"], sort=True)[0]
    order = np.argsort(user, kind="stable")
    log = log.iloc[order].reset_index(drop=True)
    user = user[order]
    lengths = np.bincount(user)
    item_counts = log["item"].value_counts().to_numpy()
    top = max(1, len(item_counts) // 100)
    ties = log.duplicated(["user", "time"], keep=False).mean()
    duplicates = log.duplicated(["user", "item", "time"], keep="first").mean()
    stats = {
        "behaviours": int(len(log)),
        "users": int(len(lengths)),
        "items": int(len(item_counts)),
        "length_p10": float(np.percentile(lengths, 10)),
        "length_median": float(np.median(lengths)),
        "length_mean": float(lengths.mean()),
        "length_p90": float(np.percentile(lengths, 90)),
        "length_p99": float(np.percentile(lengths, 99)),
        "length_max": int(lengths.max()),
        "users_ge_20": float((lengths >= 20).mean()),
        "item_gini": gini(item_counts),
        "top1pct_item_share": float(np.sort(item_counts)[::-1][:top].sum() / len(log)),
        "same_day_tie_share": float(ties),
        "duplicate_share": float(duplicates),
    }
    if "category" not in log:
        return stats
    category = pd.factorize(log["category"])[0]
    distance = _previous_distance(user, category)
    position = np.arange(len(user)) - np.searchsorted(user, user, side="left")
    eligible = position >= gap + 10
    stats["return_after_gap"] = _share(distance[eligible] >= gap)
    has_history = position > short
    long_only = (distance > short) & (distance <= short + long)
    not_short = has_history & ((distance == 0) | (distance > short))
    stats["long_only_positive"] = _share(long_only[has_history])
    stats["long_given_not_short_positive"] = _share(long_only[not_short])
    # A popularity-sampled category at each position, checked against the same user's history.
    rng = np.random.default_rng(seed)
    negative = category[rng.integers(0, len(category), len(category))]
    negative_long, negative_short = _window_hits(user, category, negative, short, long)
    negative_not_short = has_history & ~negative_short
    stats["long_only_popularity"] = _share(negative_long[has_history])
    stats["long_given_not_short_popularity"] = _share(negative_long[negative_not_short])
    stats["category_top1_share"] = float(np.bincount(category).max() / len(category))
    return stats


def _window_hits(user, category, probe, short, long) -> tuple[np.ndarray, np.ndarray]:
    """For each t: is ``probe[t]`` in the ``long`` behaviours before the last ``short`` (and not in
    those ``short``), and is it in the last ``short`` (same user)."""
    in_long = np.zeros(len(user), dtype=bool)
    in_short = np.zeros(len(user), dtype=bool)
    boundaries = np.flatnonzero(np.diff(user)) + 1
    for start, stop in zip(np.r_[0, boundaries], np.r_[boundaries, len(user)]):
        last_seen: dict[int, int] = {}
        cats = category[start:stop].tolist()
        probes = probe[start:stop].tolist()
        for t, (c, p) in enumerate(zip(cats, probes)):
            seen = last_seen.get(p)
            if seen is not None:
                in_short[start + t] = t - seen <= short
                in_long[start + t] = short < t - seen <= short + long
            last_seen[c] = t
    return in_long, in_short


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sim_merlin.datasets.statistics",
        description="Print realism statistics of an Amazon-layout behaviour log.",
    )
    parser.add_argument("--reviews", required=True)
    parser.add_argument("--meta")
    args = parser.parse_args(argv)
    stats = behaviour_statistics(read_behaviour_log(args.reviews, args.meta))
    width = max(map(len, stats))
    for key, value in stats.items():
        shown = f"{value:,.4f}" if isinstance(value, float) else f"{value:,}"
        print(f"{key:<{width}}  {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
