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
    conformal_pvalue,
    conformal_threshold,
    delivered_rate,
    effective_alpha,
    group_own_counts,
    sidak_log_pvalue,
)
from mace_ood.score.reference import split_structures


def trajectories(lengths: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    files = np.array([name for name, n in lengths.items() for _ in range(n)])
    frames = np.array([i for n in lengths.values() for i in range(n)])
    return files, frames


def test_neighbouring_frames_of_a_trajectory_never_straddle_fit_and_calibration():
    """Regression: b37067b split at random by frame, so calibration frames were MD neighbours of fit frames."""
    files, frames = trajectories({"md_300K.extxyz": 95, "md_600K.extxyz": 60, "md_900K.extxyz": 37,
                                  **{f"relaxed_{i}.cif": 1 for i in range(20)}})
    shares = []
    for seed in range(40):
        side = split_structures(files, frames, 0.2, seed, block_frames=10, gap_frames=1)
        assert set(side) <= {"fit", "calibration", "gap"} and (side == "calibration").sum() >= 1
        shares.append(np.mean(side == "calibration"))
        for name in set(files):
            order = np.argsort(frames[files == name])
            mine, blocks = side[files == name][order], frames[files == name][order] // 10
            for a, b in zip(mine[:-1], mine[1:], strict=True):
                assert {a, b} != {"fit", "calibration"}, (name, seed)
            for block in set(blocks):  # a block is never split between fit and calibration
                assert not {"fit", "calibration"} <= set(mine[blocks == block])
    assert 0.15 < np.mean(shares) < 0.25  # each group held out with probability 0.2; few groups, wide spread
    assert not np.array_equal(split_structures(files, frames, 0.2, 0), split_structures(files, frames, 0.2, 1))
    assert (split_structures(*trajectories({"a.xyz": 9}), 0.2, 0) == "fit").all()  # too few: in-sample


def test_the_split_is_stable_when_data_is_appended():
    files, frames = trajectories({"md_a.extxyz": 40, "md_b.extxyz": 40, "md_c.extxyz": 33})
    before = split_structures(files, frames, 0.25, 0)
    more_files, more_frames = trajectories({"md_a.extxyz": 40, "md_b.extxyz": 40, "md_c.extxyz": 61,
                                            "md_d.extxyz": 50, "new.cif": 1})
    order = np.random.default_rng(0).permutation(len(more_files))  # appended data may come in any order
    after = split_structures(more_files[order], more_frames[order], 0.25, 0)
    new = {(f, int(i)): s for f, i, s in zip(more_files[order], more_frames[order], after, strict=True)}
    assert (before == "calibration").any() and (before == "gap").any()
    for f, i, side in zip(files, frames, before, strict=True):  # calibration stays; fit may only become gap
        assert (side == "calibration") == (new[f, int(i)] == "calibration"), (f, i)
        assert side != "gap" or new[f, int(i)] == "gap", (f, i)


def test_at_least_two_calibration_groups_or_none():
    """Regression (the demo, MACE_T2): the hash held out one group of 10 frames; leaving its own
    group out, each calibration structure had nothing to be compared with, got p = 1, and every
    structure above 0 was flagged (112 of 122)."""
    def groups_held(n_files: int, fraction: float) -> int:
        files = np.repeat([f"/d/run{i}.extxyz" for i in range(n_files)], 10)
        side = split_structures(files, np.tile(np.arange(10), n_files), fraction, seed=0)
        return len(set(files[side == "calibration"]))

    assert groups_held(6, 0.001) == 2  # the hash alone would hold out none
    assert groups_held(3, 0.999) == 2  # all but one
    assert groups_held(2, 0.5) == 0  # two groups: in-sample, said so
    pool = Pool.of(np.arange(20.0))
    assert np.isnan(pool.log_pvalue(np.array([5.0]), np.array([20]), np.array([20]))[0])


def test_conformal_pvalue_equals_a_brute_force_count():
    rng = np.random.default_rng(11)
    calibration = np.round(rng.gamma(2.0, size=37), 1)  # ties included
    values = np.r_[np.round(rng.gamma(2.0, size=200) * 1.5, 1), calibration[:3], np.nan]
    expected = [(1 + sum(c >= x for c in calibration)) / (len(calibration) + 1) if x == x else np.nan for x in values]
    np.testing.assert_allclose(conformal_pvalue(values, calibration), expected)
    mine = np.zeros(len(values))
    mine[-4:-1] = 1  # the calibration structures themselves: leave one out
    expected_own = [sum(c >= x for c in calibration) / len(calibration) for x in values[-4:-1]]
    np.testing.assert_allclose(conformal_pvalue(values, calibration, mine, mine)[-4:-1], expected_own)
    groups = np.array(["a"] * 20 + ["b"] * 17)  # leave the own group out: a brute-force count over the others
    own_ge, own_n = group_own_counts(calibration, groups, np.ones(37, dtype=bool))
    expected_group = [(1 + sum(c >= x for c, h in zip(calibration, groups, strict=True) if h != g))
                      / (1 + sum(groups != g)) for x, g in zip(calibration, groups, strict=True)]
    np.testing.assert_allclose(conformal_pvalue(calibration, calibration, own_ge, own_n), expected_group)
    assert np.isnan(conformal_pvalue(values, calibration)[-1])


def test_the_flag_level_and_what_small_calibration_sets_deliver():
    assert effective_alpha(0.01, 199) == 0.01 and delivered_rate(0.01, 199) == pytest.approx(2 / 200)
    assert effective_alpha(0.01, 18) == pytest.approx(1 / 19) and delivered_rate(0.01, 18) == pytest.approx(1 / 19)
    assert delivered_rate(0.05, 30) == pytest.approx(1 / 31)  # floor(0.05 * 31) = 1
    assert conformal_threshold(np.arange(1.0, 19.0), 0.01) == 18.0  # n = 18: above every calibration structure
    assert conformal_threshold(np.arange(1.0, 200.0), 0.01) == 198.0  # 1 of 199 may be at or above


def test_exchangeable_data_is_flagged_at_the_stated_rate():
    """The finite-sample rule, by simulation: P(p <= alpha) = floor(alpha (n+1)) / (n+1)."""
    rng = np.random.default_rng(3)
    n, trials = 49, 4000
    data = rng.standard_normal((trials, n + 1))
    flagged = np.mean([conformal_pvalue(row[:1], row[1:])[0] <= effective_alpha(0.1, n) for row in data])
    assert abs(flagged - delivered_rate(0.1, n)) < 0.015 and delivered_rate(0.1, n) == pytest.approx(0.1)


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
    pulled under the threshold by asinh of its negative force exceedance (b37067b: 3 of 10 flagged)."""
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
