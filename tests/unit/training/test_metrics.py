import numpy as np
import pytest
import tensorflow as tf

from sim_merlin.training.metrics import roc_auc, thresholded_roc_auc


def _scores(seed=0, n=400):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    scores = np.round(1 / (1 + np.exp(-(rng.normal(size=n) + labels))), 2)  # ties on purpose
    return labels, scores


def test_exact_auc_is_the_pairwise_probability_with_ties_counting_half():
    labels, scores = _scores()
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairwise = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert roc_auc(labels, scores) == pytest.approx(pairwise, abs=1e-12)
    assert roc_auc(labels, -scores) == pytest.approx(1 - pairwise, abs=1e-12)
    assert np.isnan(roc_auc(np.ones(3), np.arange(3)))
    with pytest.raises(ValueError, match="differ in shape"):
        roc_auc(np.ones(3), np.ones(4))


def test_thresholded_auc_matches_keras_8000_threshold_auc():
    labels, scores = _scores(1, 3000)
    metric = tf.keras.metrics.AUC(num_thresholds=8000)
    metric.update_state(labels, scores)
    assert thresholded_roc_auc(labels, scores) == pytest.approx(float(metric.result()), abs=1e-5)
    assert abs(thresholded_roc_auc(labels, scores) - roc_auc(labels, scores)) < 0.01
