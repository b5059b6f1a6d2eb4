"""The predicted force error: a power law in the committee deviation (ranking exactly as its input),
and a normalized cross-conformal upper bound over runs whose coverage of new runs is the level
the number of runs can deliver."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import spearmanr

from mace_ood.score.errors import fit_error_model, fit_power_law, run_level_quantile


def runs(rng, n_runs: int, frames: int):
    """Committee deviations and force errors of MD runs: each run its own level (a random effect
    shared by its frames), errors a noisy power law of the deviation."""
    level = rng.lognormal(np.log(0.03), 0.5, n_runs)
    sigma = np.concatenate([lv * rng.lognormal(0, 0.2, frames) for lv in level])
    error = 2.0 * sigma**0.8 * rng.lognormal(0, 0.25, len(sigma)) * np.repeat(rng.lognormal(0, 0.15, n_runs), frames)
    return sigma, error, np.repeat([f"run{i}" for i in range(n_runs)], frames)


def test_the_map_is_the_log_log_least_squares_line_and_ranks_as_its_input():
    rng = np.random.default_rng(0)
    sigma, error, groups = runs(rng, 12, 8)
    model = fit_error_model(sigma, error, groups, "force_deviation_mean", 0.9)
    b, log_a = np.polyfit(np.log(sigma), np.log(error), 1)  # numpy, independently
    assert model.exponent == pytest.approx(b, rel=1e-10) and model.coefficient == pytest.approx(np.exp(log_a), rel=1e-10)
    grid = np.geomspace(1e-4, 10, 50)  # inside and far beyond the validation range
    assert np.all(np.diff(model.predict(grid)) > 0)  # strictly increasing: no clipped plateau
    new_sigma, new_error, _ = runs(rng, 30, 5)
    assert spearmanr(model.predict(new_sigma), new_error)[0] == pytest.approx(spearmanr(new_sigma, new_error)[0])
    beyond = grid > sigma.max()
    assert (model.is_lower_bound(grid) == beyond).all() and np.isnan(model.upper(grid)[beyond]).all()
    with pytest.raises(ValueError, match="2 or more"):
        fit_power_law(np.array([0.0, 1.0]), np.array([1.0, 1.0]))


def test_the_run_level_quantile_is_the_median_order_statistic_of_one_draw_per_run():
    """Reference: every way of drawing one value from each run (itertools), the ceil(level (G + 1))-th
    smallest of each draw, and the median of those (each draw equally likely)."""
    import itertools

    values = np.array([0.5, 3.0, 1.0, 2.0, 2.5, 0.1, 4.0, 1.5])
    groups = np.array(["a", "a", "b", "b", "b", "c", "d", "d"])
    runs_ = [values[groups == g] for g in "abcd"]
    for level, rank in ((0.3, 2), (0.5, 3), (0.75, 4), (0.9, 4)):
        statistics = np.sort([np.sort(draw)[rank - 1] for draw in itertools.product(*runs_)])
        median = statistics[math.ceil(0.5 * len(statistics)) - 1]  # the smallest v with P(statistic <= v) >= 1/2
        got, delivered = run_level_quantile(values, groups, level)
        assert got == median, level
        assert delivered == pytest.approx(min(level, 4 / 5)), level


@pytest.mark.parametrize(("n_runs", "level"), [(12, 0.9), (4, 0.9), (30, 0.8)])
def test_new_runs_are_covered_at_the_delivered_level(n_runs, level):
    """Over 300 validation files of n runs, the bound's coverage of new runs drawn alike is the
    delivered level min(level, G / (G + 1)), within 0.05 (run-level discreteness:
    ceil(level (G + 1)) / (G + 1) is what one order statistic of G runs gives)."""
    rng = np.random.default_rng(n_runs)
    coverage, from_below, delivered = [], [], []
    for _ in range(300):
        model = fit_error_model(*runs(rng, n_runs, 6), "s", level)
        new_sigma, new_error, _ = runs(rng, 40, 6)
        upper = model.upper(new_sigma)
        inside = np.isfinite(upper)
        coverage.append(np.mean(new_error[inside] <= upper[inside]))
        from_below.append(np.mean(new_error >= model.lower(new_sigma)))
        delivered.append(model.delivered_level)
    coverage = np.array(coverage)
    print(n_runs, level, "coverage", coverage.mean(), "from below", np.mean(from_below), "delivered", np.mean(delivered))
    assert abs(np.mean(from_below) - np.mean(delivered)) <= 0.05 + 3 * np.std(from_below) / np.sqrt(len(from_below))
    assert np.mean(delivered) == pytest.approx(min(level, n_runs / (n_runs + 1)))
    standard_error = coverage.std() / np.sqrt(len(coverage))
    assert abs(coverage.mean() - np.mean(delivered)) <= 0.05 + 3 * standard_error


def test_one_run_gives_no_bound():
    sigma, error, _ = runs(np.random.default_rng(2), 1, 10)
    model = fit_error_model(sigma, error, np.array(["run0"] * 10), "s", 0.9)
    assert math.isinf(model.factor) and model.n_groups == 1
