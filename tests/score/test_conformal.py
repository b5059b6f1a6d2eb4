"""The flag and the combined score (mace_ood.score.conformal): group split, conformal p-values
against brute-force counts, the finite-sample rule, size awareness, no vetoes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mace_ood.config import SelectConfig
from mace_ood.records import EvaluationPlan
from mace_ood.score.calibrate import add_percentiles
from mace_ood.score.conformal import (
    Pool,
    delivered_rate,
    effective_alpha,
    group_own_counts,
    group_pvalue,
    group_threshold,
    sidak_log_pvalue,
)
from mace_ood.score.reference import (
    assign_folds,
    fold_references,
    procrustes_rotation,
    ridge_precision,
)


def test_the_group_pvalue_is_the_average_rank_over_one_frame_per_run():
    """Reference: every way of drawing one frame from each run, the plain conformal p-value of each
    draw (itertools, brute force), averaged."""
    import itertools

    rng = np.random.default_rng(3)
    sizes = [1, 3, 4, 2]
    calibration = np.round(rng.normal(size=sum(sizes)), 1)  # ties on purpose
    groups = np.repeat([f"run{g}" for g in range(len(sizes))], sizes)
    queries = np.r_[calibration, -9.0, 9.0, 0.05]
    runs = [calibration[groups == f"run{g}"] for g in range(len(sizes))]
    draws = list(itertools.product(*runs))
    expected = [np.mean([(1 + sum(v >= q for v in draw)) / (len(sizes) + 1) for draw in draws]) for q in queries]
    np.testing.assert_allclose(group_pvalue(queries, calibration, groups), expected, rtol=1e-12)
    assert group_pvalue(np.array([9.0]), calibration, groups)[0] == pytest.approx(1 / 5)  # the floor: 1 / (G + 1)
    # a calibration structure leaves its own run out: the average over draws from the other runs
    own_ge, own_n = group_own_counts(calibration, groups, np.ones(len(calibration), dtype=bool))
    own = group_pvalue(calibration, calibration, groups, own_ge, own_n)
    for i, (q, g) in enumerate(zip(calibration, groups, strict=True)):
        others = [r for k, r in enumerate(runs) if f"run{k}" != g]
        ranks = [(1 + sum(v >= q for v in draw)) / len(sizes) for draw in itertools.product(*others)]
        assert own[i] == pytest.approx(np.mean(ranks), rel=1e-12)
    assert group_threshold(calibration, groups, 0.01) == calibration.max()  # 4 runs: above every one


def test_fold_statistics_equal_a_refit_without_the_fold():
    rng = np.random.default_rng(0)
    samples = rng.normal(size=(3, 300, 5)) * rng.uniform(0.5, 2, (3, 1, 5)) + 10.0  # an offset, as latents have
    fold = rng.integers(0, 4, 300)
    folds = fold_references(samples, fold, 4, ridge=1e-3)
    for k in range(4):
        rest = samples[:, fold != k]
        centred0 = rest[0] - rest[0].mean(axis=0)
        for s in range(3):
            mean, precision = ridge_precision(rest[s], 1e-3)
            np.testing.assert_allclose(folds[k].seeds[s].mean, mean, rtol=1e-12)
            np.testing.assert_allclose(folds[k].seeds[s].precision, precision, rtol=1e-8)
            np.testing.assert_allclose(folds[k].seeds[s].rotation, procrustes_rotation(rest[s] - mean, centred0),
                                       atol=1e-9)


def test_folds_hold_whole_runs_one_run_each_when_few_and_do_not_move_when_rows_do():
    few = np.repeat(["a#run0", "a#run1", "b#run0"], [30, 30, 5])
    folds = assign_folds(few, 10)
    assert sorted(set(folds)) == [0, 1, 2] and all(len(set(folds[few == g])) == 1 for g in set(few))
    many = np.repeat([f"md.xyz#run{i}" for i in range(35)], 4)
    folds = assign_folds(many, 10)
    assert (np.bincount(folds) // 4).tolist() == [4] * 5 + [3] * 5  # balanced in runs (4 frames each)
    order = np.random.default_rng(0).permutation(len(many))
    np.testing.assert_array_equal(assign_folds(many[order], 10), folds[order])


def test_a_calibration_structure_alone_in_the_pool_has_no_pvalue():
    pool = Pool.of(np.arange(20.0))
    assert np.isnan(pool.log_pvalue(np.array([5.0]), np.array([20]), np.array([20]))[0])


def test_with_one_structure_per_group_the_group_pvalue_is_the_plain_conformal_count():
    rng = np.random.default_rng(11)
    calibration = np.round(rng.gamma(2.0, size=37), 1)  # ties included
    alone = np.arange(37).astype(str)
    values = np.r_[np.round(rng.gamma(2.0, size=200) * 1.5, 1), calibration[:3], np.nan]
    expected = [(1 + sum(c >= x for c in calibration)) / (len(calibration) + 1) if x == x else np.nan for x in values]
    np.testing.assert_allclose(group_pvalue(values, calibration, alone), expected)
    groups = np.array(["a"] * 20 + ["b"] * 17)  # two runs: each counted once, its own left out for its members
    own_ge, own_n = group_own_counts(calibration, groups, np.ones(37, dtype=bool))
    expected_group = [(1 + np.mean([c >= x for c, h in zip(calibration, groups, strict=True) if h != g])) / 2
                      for x, g in zip(calibration, groups, strict=True)]
    np.testing.assert_allclose(group_pvalue(calibration, calibration, groups, own_ge, own_n), expected_group)
    assert np.isnan(group_pvalue(values, calibration, alone)[-1])


def test_the_flag_level_and_what_small_calibration_sets_deliver():
    assert effective_alpha(0.01, 199) == 0.01 and delivered_rate(0.01, 199) == pytest.approx(2 / 200)
    assert effective_alpha(0.01, 18) == pytest.approx(1 / 19) and delivered_rate(0.01, 18) == pytest.approx(1 / 19)
    assert delivered_rate(0.05, 30) == pytest.approx(1 / 31)  # floor(0.05 * 31) = 1
    alone = np.arange(199).astype(str)
    assert group_threshold(np.arange(1.0, 19.0), alone[:18], 0.01) == 18.0  # n = 18: above every one
    assert group_threshold(np.arange(1.0, 200.0), alone, 0.01) == 198.0  # 1 of 199 may be at or above


def test_new_runs_are_flagged_at_most_at_the_stated_rate():
    """The finite-sample rule over runs, by simulation: 19 calibration runs of 5 correlated frames
    (a run effect as large as the frame noise); a frame of a new run is flagged at most at
    floor(alpha (G + 1)) / (G + 1) = 0.1, and not far below it."""
    rng = np.random.default_rng(3)
    n_runs, frames, trials = 19, 5, 3000
    groups = np.repeat(np.arange(n_runs).astype(str), frames)
    flagged = []
    for _ in range(trials):
        runs = rng.standard_normal((n_runs + 1, 1)) + rng.standard_normal((n_runs + 1, frames))
        calibration, new = runs[:-1].ravel(), runs[-1, :1]
        flagged.append(group_pvalue(new, calibration, groups)[0] <= effective_alpha(0.1, n_runs))
    rate = np.mean(flagged)
    assert rate <= delivered_rate(0.1, n_runs) + 0.015 and delivered_rate(0.1, n_runs) == pytest.approx(0.1)
    assert rate > 0.05


def test_pool_pvalues_are_the_empirical_count_inside_the_pool_and_keep_ranking_beyond_it():
    """Regression: the tail also replaced the count above its start where it was smaller, which
    flagged 4x4x4 Pd cells at 0.22 for alpha = 0.1 (tests/test_flag_rate.py, 2x2x2 training)."""
    rng = np.random.default_rng(4)
    pool_values = rng.gamma(3.0, size=500)
    pool = Pool.of(pool_values)
    inside = np.concatenate([np.linspace(0, pool_values.max(), 50), np.sort(pool_values)[-20:]])
    expected = [(1 + (pool_values >= x).sum()) / 501 for x in inside]
    np.testing.assert_allclose(np.exp(pool.log_pvalue(inside)), expected)
    far = pool_values.max() * np.array([1.0, 1.5, 3.0, 30.0, 3000.0])
    log_p = pool.log_pvalue(far)
    assert np.all(np.diff(log_p) < 0) and np.isfinite(log_p).all()  # no ties at 1/(N+1)
    assert np.all(np.diff(pool.log_pvalue(np.linspace(0, 3 * pool_values.max(), 400))) <= 1e-15)  # monotone


def test_sidak_adjustment_equals_one_minus_the_product():
    p = np.array([0.5, 0.01, 1e-3, 1e-12, 1e-300])
    for n in (1, 4, 32, 500):
        expected = np.where(n * p < 1e-8, n * p, 1 - (1 - p.astype(np.longdouble)) ** n).astype(float)
        np.testing.assert_allclose(np.exp(sidak_log_pvalue(np.log(p), np.full(5, n))), expected, rtol=1e-6)


def test_a_component_far_below_its_median_cannot_veto_another():
    """Regression: a perfect strained cell (zero force deviation, new to the density score) was
    pulled under the threshold by asinh of its negative force exceedance (3 of 10 flagged with the asinh combination)."""
    rng = np.random.default_rng(8)
    n = 200
    reference = pd.DataFrame({
        "structure_id": [f"r{i}" for i in range(n)], "n_atoms": 32, "split": "calibration",
        "mahalanobis": rng.gamma(4.0, size=n), "force_deviation_mean": rng.gamma(4.0, 0.01, size=n),
    })
    strained = pd.DataFrame({"structure_id": [f"s{i}" for i in range(10)], "n_atoms": 32,
                             "mahalanobis": reference["mahalanobis"].max() * np.linspace(1.2, 3, 10),
                             "force_deviation_mean": 0.0})
    tables = {"F__D": reference, "F__S": strained}
    evaluations = [EvaluationPlan("F", "D", True, ()), EvaluationPlan("F", "S", False, ())]
    add_percentiles(tables, evaluations, SelectConfig(combine=["mahalanobis", "force_deviation_mean"]))
    assert strained["ood"].all() and set(strained["combined_driver"]) == {"mahalanobis"}
    assert np.all(np.diff(strained["combined"]) > 0)  # still ranked by how far out
    assert (strained["combined"] > reference["combined"].max()).all()
    assert reference["ood"].mean() <= 0.01 + 1e-9  # the calibration rows themselves, each left out of its pool


def test_percentiles_and_the_flag_use_the_calibration_rows_only():
    reference = pd.DataFrame({"structure_id": [f"r{i}" for i in range(10)], "n_atoms": 4,
                              "mahalanobis": np.arange(10.0), "split": ["fit"] * 5 + ["calibration"] * 5})
    other = pd.DataFrame({"structure_id": ["a", "b", "c"], "n_atoms": 4, "mahalanobis": [4.5, 7.0, 100.0]})
    tables = {"F__D": reference, "F__X": other}
    evaluations = [EvaluationPlan("F", "D", True, ()), EvaluationPlan("F", "X", False, ())]
    delivered = add_percentiles(tables, evaluations, SelectConfig(score="mahalanobis", combine=["mahalanobis"],
                                                                   alpha=0.34))
    # calibration values are 5..9: 4.5 is below all of them, 7.0 above 3 of 5 and at or below 3
    np.testing.assert_allclose(other["mahalanobis_percentile"], [0.0, 60.0, 100.0])
    np.testing.assert_allclose(other["mahalanobis_pvalue"], [6 / 6, 4 / 6, 1 / 6])
    assert list(other["ood"]) == [False, False, True]
    assert delivered["F"]["n_calibration"] == 5 and delivered["F"]["delivered_rate"] == pytest.approx(2 / 6)
    # leave-one-out on the calibration rows themselves: the largest has p = 1/5
    np.testing.assert_allclose(reference["mahalanobis_pvalue"][5:], [5 / 5, 4 / 5, 3 / 5, 2 / 5, 1 / 5])


def test_counts_within_groups_equal_a_loop():
    """The vectorised own-group counts (one sort) equal a loop over groups, ties included."""
    from mace_ood.score.conformal import at_or_above_in_group

    rng = np.random.default_rng(12)
    members, member_groups = rng.integers(0, 20, 500).astype(float), rng.integers(0, 30, 500)
    queries, query_groups = rng.integers(0, 22, 200).astype(float), rng.integers(0, 32, 200)
    ge, size = at_or_above_in_group(members, member_groups, queries, query_groups)
    for i, (x, g) in enumerate(zip(queries, query_groups, strict=True)):
        assert ge[i] == np.sum(members[member_groups == g] >= x) and size[i] == np.sum(member_groups == g)
