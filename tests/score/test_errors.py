"""The predicted force error: an isotonic map fitted on half a validation set, and a split conformal
upper bound whose coverage on new data drawn alike is the promised level."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.isotonic import IsotonicRegression

from mace_ood.score.errors import conformal_margin, fit_error_model, split_halves


def synthetic(rng, n):
    """Scores and force errors with a known monotone trend and skewed noise."""
    x = rng.uniform(0, 3, n)
    return x, 0.05 + 0.1 * x**2 + rng.gamma(2.0, 0.03 + 0.02 * x)


def test_the_map_is_scikit_learns_isotonic_fit_on_the_fit_half():
    rng = np.random.default_rng(0)
    x, y = synthetic(rng, 200)
    fit = split_halves(np.arange(200).astype(str))
    assert 60 < fit.sum() < 140
    model = fit_error_model(x, y, fit, "combined", 0.9)
    reference = IsotonicRegression(increasing=True, out_of_bounds="clip").fit(x[fit], y[fit])
    grid = np.linspace(-1, 4, 301)
    np.testing.assert_allclose(model.predict(grid), reference.predict(grid), rtol=1e-12)
    residuals = y[~fit] - reference.predict(x[~fit])
    k = math.ceil(0.9 * (len(residuals) + 1))
    assert model.margin == max(0.0, np.sort(residuals)[k - 1])  # a brute-force order statistic, at least 0
    np.testing.assert_allclose(model.upper(grid), reference.predict(grid) + model.margin)


@pytest.mark.parametrize("level", [0.8, 0.9])
def test_upper_bound_coverage_is_the_promised_level(level):
    """Over 400 validation sets of 60 structures, the bound covers new structures drawn alike at
    ceil(level (m + 1)) / (m + 1) on average (m calibration structures): within 3 standard errors."""
    rng = np.random.default_rng(1)
    coverage, promised = [], []
    for _ in range(400):
        x, y = synthetic(rng, 60)
        fit = split_halves(np.arange(60).astype(str), seed=int(rng.integers(1 << 30)))
        model = fit_error_model(x, y, fit, "s", level)
        m = int((~fit).sum())
        new_x, new_y = synthetic(rng, 500)
        coverage.append(np.mean(new_y <= model.upper(new_x)))
        promised.append(min(1.0, math.ceil(level * (m + 1)) / (m + 1)))
    coverage, promised = np.array(coverage), np.array(promised)
    standard_error = coverage.std() / np.sqrt(len(coverage))
    assert abs(coverage.mean() - promised.mean()) < 3 * standard_error + 1e-3
    assert coverage.mean() >= level - 3 * standard_error


def test_too_few_calibration_structures_give_no_finite_bound():
    assert conformal_margin(np.array([0.1, 0.2]), 0.9) == math.inf
    assert conformal_margin(np.arange(9.0), 0.9) == 8.0


def test_halves_split_by_group_keep_frames_of_one_run_together():
    groups = np.repeat([f"run{i}" for i in range(20)], 10)
    fit = split_halves(groups)
    for g in np.unique(groups):
        assert len(set(fit[groups == g])) == 1
    assert 0 < fit.sum() < len(fit)
