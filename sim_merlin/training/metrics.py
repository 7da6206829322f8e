"""ROC AUC computed exactly over a whole evaluation set, and the reference's thresholded variant.

Example::

    >>> import numpy as np
    >>> roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    0.75
"""
from __future__ import annotations

import numpy as np


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Exact ROC AUC: the Mann-Whitney U statistic with average ranks for tied scores.

    Equals the probability that a random positive scores above a random negative (ties count
    half). NaN when one class is absent.
    """
    labels = np.asarray(labels).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} differ in shape")
    positives = labels == 1
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(scores)]
    average_rank = (starts + ends + 1) / 2.0  # ranks are 1-based
    ranks = np.empty(len(scores))
    ranks[order] = np.repeat(average_rank, ends - starts)
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def thresholded_roc_auc(labels: np.ndarray, probabilities: np.ndarray,
                        num_thresholds: int = 8000) -> float:
    """The reference's AUC: ``tf.keras.metrics.AUC(num_thresholds=8000)`` semantics (ROC,
    trapezoidal interpolation over evenly spaced thresholds in [0, 1]), for comparison."""
    labels = np.asarray(labels).ravel().astype(bool)
    probabilities = np.asarray(probabilities, dtype=np.float64).ravel()
    epsilon = 1e-7
    thresholds = np.concatenate(
        [[-epsilon], (np.arange(1, num_thresholds - 1) / (num_thresholds - 1)), [1 + epsilon]]
    )
    # Bucket b holds the probabilities above thresholds[0..b]: counts above each threshold are
    # suffix sums of the bucket histogram.
    bucket = np.searchsorted(thresholds, probabilities, side="left") - 1
    tp = np.cumsum(np.bincount(bucket[labels], minlength=num_thresholds)[::-1])[::-1]
    fp = np.cumsum(np.bincount(bucket[~labels], minlength=num_thresholds)[::-1])[::-1]
    tpr = tp / max(labels.sum(), 1)
    fpr = fp / max((~labels).sum(), 1)
    return float(np.sum((fpr[:-1] - fpr[1:]) * (tpr[:-1] + tpr[1:]) / 2.0))
