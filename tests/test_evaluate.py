from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from mace_ood.evaluate import bootstrap_interval, roc_auc, spearman


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_scipy_and_sklearn(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(60)
    y = x + rng.standard_normal(60)
    x[:5] = x[5]  # ties
    labels = rng.random(60) > 0.6
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    assert roc_auc(x, labels) == pytest.approx(roc_auc_score(labels, x), abs=1e-12)


def test_degenerate_inputs_are_nan():
    assert np.isnan(roc_auc(np.arange(4.0), np.ones(4)))
    assert np.isnan(spearman(np.ones(5), np.arange(5.0)))


def test_bootstrap_interval_contains_the_estimate_and_keeps_strata():
    rng = np.random.default_rng(3)
    scores = np.concatenate([rng.normal(0, 1, 50), rng.normal(1, 1, 50)])
    labels = np.repeat([False, True], 50)
    low, high = bootstrap_interval(roc_auc, (scores, labels), 300, strata=labels)
    assert low < roc_auc(scores, labels) < high and 0.5 < low and high < 1.0
