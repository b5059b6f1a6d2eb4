"""Honest calibration: every training structure is scored by the reference fitted without its
fold of whole groups, and every percentile, threshold and the combined score are taken on those
out-of-fold scores."""

from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr
from sklearn.neighbors import NearestNeighbors

from mace_ood.config import ScoresConfig
from mace_ood.records import EvaluationPlan
from mace_ood.score.calibrate import percentile_against
from mace_ood.score.evaluation import fit_family_reference, score_evaluation
from mace_ood.score.reference import FamilyReference
from tests.synthetic import synthetic_latent_files


def training_run(tmp_path, n_structures=40, knn_k=1, chunk_atoms=64):
    sizes = tuple(int(s) for s in np.random.default_rng(0).integers(3, 9, n_structures))
    paths, latents, sizes = synthetic_latent_files(tmp_path / "latents", n_seeds=2, sizes=sizes, n_features=4)
    evaluation = EvaluationPlan("F", "D", True, tuple(str(p) for p in paths))
    scores = ScoresConfig(knn_k=knn_k, reference_max_atoms=100000, gmm_components=[1])
    reference_file = fit_family_reference(evaluation, tmp_path, scores)
    scores_file = score_evaluation(evaluation, tmp_path, chunk_atoms, reference_file)
    return evaluation, latents, sizes, FamilyReference.load(reference_file), scores_file


def test_every_training_atom_is_scored_by_a_reference_fitted_without_its_fold(tmp_path):
    evaluation, latents, sizes, reference, scores_file = training_run(tmp_path)
    ids = np.array([f"s{i}" for i in range(len(sizes))])
    fold = np.array([reference.structure_fold[i] for i in ids])
    assert len(reference.folds) == len(set(fold)) >= 2 and not reference.calibration_in_sample
    atom_fold = np.repeat(fold, sizes)
    with xr.open_dataset(scores_file) as ds:
        assert set(ds["split"].values.astype(str)) == {"out-of-fold"}
        np.testing.assert_array_equal(ds["fold"].values, fold)
        knn, mahalanobis = ds["atom_knn_distance"].values, ds["atom_mahalanobis"].values
    # brute force, per fold: distance to the nearest atom of the other folds (every atom sampled), and
    # Mahalanobis against a covariance refitted on them (numpy), per seed, averaged
    for k in sorted(set(fold)):
        mine, rest = atom_fold == k, atom_fold != k
        expected_knn = np.mean([NearestNeighbors(n_neighbors=1).fit(latents[s][rest]).kneighbors(
            latents[s][mine])[0][:, 0] for s in range(2)], axis=0)
        np.testing.assert_allclose(knn[mine], expected_knn, rtol=1e-9)
        expected_mahalanobis = []
        for s in range(2):
            mean, cov = latents[s][rest].mean(axis=0), np.cov(latents[s][rest], rowvar=False)
            precision = np.linalg.inv(cov + 1e-3 * np.trace(cov) / len(cov) * np.eye(len(cov)))
            centred = latents[s][mine] - mean
            expected_mahalanobis.append(np.sqrt(np.einsum("ij,jk,ik->i", centred, precision, centred)))
        np.testing.assert_allclose(mahalanobis[mine], np.mean(expected_mahalanobis, axis=0), rtol=1e-8)
    assert (knn > 0).all()  # no atom finds itself


def test_per_structure_max_and_descriptor_against_loops(tmp_path):
    evaluation, latents, sizes, reference, scores_file = training_run(tmp_path, n_structures=16, chunk_atoms=5)
    bounds = np.cumsum([0, *sizes])
    with xr.open_dataset(scores_file) as ds:
        for name in ("latent_variance", "mahalanobis", "knn_distance", "gmm_nll", "aligned_latent_variance"):
            per_atom = ds[f"atom_{name}"].values
            expected = [per_atom[a:b].max() for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
            np.testing.assert_allclose(ds[f"{name}_max"].values, expected, rtol=1e-12)
        aligned = np.mean([(latents[s] - r.mean) @ r.rotation for s, r in enumerate(reference.seeds)], axis=0)
        whitened = aligned @ np.linalg.cholesky(reference.seeds[0].precision)
        # novel atoms: out-of-fold mahalanobis (as a new structure's, by a reference that has not seen it)
        # above the threshold; the rows are in the family's frame, whitened by its seed 0
        full = ds["atom_mahalanobis"].values
        novel = full > reference.novel_atom_threshold
        assert novel.any() and not novel.all()
        expected = np.stack([
            whitened[a:b][novel[a:b]].mean(axis=0) if novel[a:b].any() else whitened[a + np.argmax(full[a:b])]
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)
        ])
        # chunks of 5 atoms split most structures: the blockwise max must join their pieces
        np.testing.assert_allclose(ds["descriptor"].values, expected, rtol=1e-9, atol=1e-12)
        assert ds["mahalanobis_max"].attrs["units"] == "1" and ds["atom_knn_distance"].attrs["units"] == "latent"
        assert ds["latent_variance"].attrs["units"] == "latent^2" and ds["gmm_nll"].attrs["units"] == "nat"


def test_a_nan_score_is_neither_ood_nor_first():
    """Regression: NaN got percentile 100 (flagged ood) and crashed the ranking after all the compute."""
    from mace_ood.score.tables import rank_table

    percent = percentile_against(np.array([np.nan, 0.5, 5.0, np.inf]), np.arange(4.0))
    assert np.isnan(percent[0]) and percent[1] == 25.0 and percent[2] == percent[3] == 100.0
    table = pd.DataFrame({"family": "F", "dataset": "D", "reference": False, "structure_id": ["a", "b", "c"],
                          "source_file": "x", "frame_index": [0, 1, 2], "formula": "Cu", "n_atoms": 1,
                          "combined": [np.nan, 2.0, 1.0]})
    ranked = rank_table(table, "combined")
    assert list(ranked["structure_id"]) == ["b", "c", "a"] and list(ranked["rank"]) == [1, 2, 3]
