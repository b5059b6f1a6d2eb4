"""Honest calibration: the reference is fitted on one part of the training set and every
percentile, threshold and the combined score are taken on the other part."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from sklearn.neighbors import NearestNeighbors

from mace_ood.config import ScoresConfig, SelectConfig
from mace_ood.records import EvaluationPlan
from mace_ood.score.calibrate import (
    add_percentiles,
    combine_exceedances,
    exceedance,
    percentile_against,
)
from mace_ood.score.evaluation import fit_family_reference, score_evaluation
from mace_ood.score.reference import FamilyReference, split_structures
from tests.synthetic import synthetic_latent_files


def test_split_is_seeded_by_structure_and_sized():
    a = split_structures(50, 0.2, seed=3)
    assert a.sum() == 10 and np.array_equal(a, split_structures(50, 0.2, seed=3))
    assert not np.array_equal(a, split_structures(50, 0.2, seed=4))
    assert split_structures(12, 0.01, 0).sum() == 2  # at least 2 held out
    assert not split_structures(9, 0.2, 0).any()  # too few: nothing held out (documented rule)


def training_run(tmp_path, n_structures=40, knn_k=1):
    sizes = tuple(int(s) for s in np.random.default_rng(0).integers(3, 9, n_structures))
    paths, latents, sizes = synthetic_latent_files(tmp_path / "latents", n_seeds=2, sizes=sizes, n_features=4)
    evaluation = EvaluationPlan("F", "D", True, tuple(str(p) for p in paths))
    scores = ScoresConfig(knn_k=knn_k, reference_max_atoms=100000, gmm_components=[1])
    reference_file = fit_family_reference(evaluation, tmp_path, scores)
    scores_file = score_evaluation(evaluation, tmp_path, 64, reference_file)
    return evaluation, latents, sizes, FamilyReference.load(reference_file), scores_file


def test_no_calibration_atom_is_scored_against_a_reference_that_contains_it(tmp_path):
    evaluation, latents, sizes, reference, scores_file = training_run(tmp_path)
    ids = np.array([f"s{i}" for i in range(len(sizes))])
    held_out = np.isin(ids, reference.calibration_ids)
    assert held_out.sum() == 8 and not reference.calibration_in_sample
    bounds = np.cumsum([0, *sizes])
    fit_atoms = np.concatenate([np.arange(bounds[i], bounds[i + 1]) for i in np.flatnonzero(~held_out)])
    calibration_atoms = np.concatenate([np.arange(bounds[i], bounds[i + 1]) for i in np.flatnonzero(held_out)])
    # the k-NN set is exactly the fit atoms (every one sampled), none of the calibration atoms
    np.testing.assert_array_equal(reference.seeds[0].sample, latents[0][fit_atoms])
    with xr.open_dataset(scores_file) as ds:
        split = ds["split"].values.astype(str)
        knn = ds["atom_knn_distance"].values
    assert list(split[held_out]) == ["calibration"] * 8 and set(split[~held_out]) == {"fit"}
    # brute force: distance to the nearest fit atom, per seed, averaged
    expected = np.mean([
        NearestNeighbors(n_neighbors=1).fit(latents[s][fit_atoms]).kneighbors(latents[s][calibration_atoms])[0][:, 0]
        for s in range(2)
    ], axis=0)
    np.testing.assert_allclose(knn[calibration_atoms], expected, rtol=1e-9)
    assert (knn[calibration_atoms] > 0).all()  # no self-match
    assert knn[fit_atoms].max() == 0.0 < knn[calibration_atoms].min()  # in-sample atoms find themselves


def test_percentiles_use_the_calibration_rows_only():
    reference = pd.DataFrame({"mahalanobis": np.arange(10.0), "split": ["fit"] * 5 + ["calibration"] * 5})
    other = pd.DataFrame({"mahalanobis": [4.5, 7.0, 100.0]})
    tables = {"F__D": reference, "F__X": other}
    evaluations = [EvaluationPlan("F", "D", True, ()), EvaluationPlan("F", "X", False, ())]
    add_percentiles(tables, evaluations, SelectConfig(score="mahalanobis", combine=["mahalanobis"], ood_percentile=50))
    # calibration values are 5..9: 4.5 is below all of them, 7.0 above 3 of 5
    np.testing.assert_allclose(other["mahalanobis_percentile"], [0.0, 60.0, 100.0])
    assert list(other["ood"]) == [False, True, True]


def test_combined_score_equals_a_numpy_reference():
    rng = np.random.default_rng(5)
    calibration = {"a": rng.gamma(2.0, size=200), "b": rng.normal(10, 3, size=200)}
    values = {"a": rng.gamma(2.0, size=50) * 3, "b": rng.normal(14, 3, size=50)}
    expected = np.zeros(50)
    for name in values:
        median = np.median(calibration[name])
        p99 = np.quantile(calibration[name], 0.99)  # numpy's linear interpolation, like np.percentile
        expected += np.arcsinh((values[name] - median) / (p99 - median))
    expected /= 2
    np.testing.assert_allclose(combine_exceedances(values, calibration), expected, rtol=1e-12)
    assert exceedance(np.array([np.median(calibration["b"])]), calibration["b"])[0] == pytest.approx(0.0, abs=1e-12)


def test_per_structure_max_and_descriptor_against_loops(tmp_path):
    evaluation, latents, sizes, reference, scores_file = training_run(tmp_path, n_structures=12)
    bounds = np.cumsum([0, *sizes])
    with xr.open_dataset(scores_file) as ds:
        for name in ("latent_variance", "mahalanobis", "knn_distance", "gmm_nll", "aligned_latent_variance"):
            per_atom = ds[f"atom_{name}"].values
            expected = [per_atom[a:b].max() for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
            np.testing.assert_allclose(ds[f"{name}_max"].values, expected, rtol=1e-12)
        aligned = np.mean([(latents[s] - r.mean) @ r.rotation for s, r in enumerate(reference.seeds)], axis=0)
        expected = np.stack([aligned[a:b].mean(axis=0) for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
        np.testing.assert_allclose(ds["descriptor"].values, expected, rtol=1e-9, atol=1e-12)
        assert ds["mahalanobis_max"].attrs["units"] == "1" and ds["atom_knn_distance"].attrs["units"] == "latent"
        assert ds["latent_variance"].attrs["units"] == "latent^2" and ds["gmm_nll"].attrs["units"] == "nat"


def test_a_nan_score_is_neither_ood_nor_first():
    """Regression: NaN got percentile 100 (flagged ood) and crashed the ranking after all the compute."""
    from mace_ood.report.tables import rank_table

    percent = percentile_against(np.array([np.nan, 0.5, 5.0, np.inf]), np.arange(4.0))
    assert np.isnan(percent[0]) and percent[1] == 25.0 and percent[2] == percent[3] == 100.0
    table = pd.DataFrame({"family": "F", "dataset": "D", "reference": False, "structure_id": ["a", "b", "c"],
                          "source_file": "x", "frame_index": [0, 1, 2], "formula": "Cu", "n_atoms": 1,
                          "combined": [np.nan, 2.0, 1.0]})
    ranked = rank_table(table, "combined")
    assert list(ranked["structure_id"]) == ["b", "c", "a"] and list(ranked["rank"]) == [1, 2, 3]
