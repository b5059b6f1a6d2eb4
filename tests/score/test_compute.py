"""The OOD scores against independent references (numpy, scipy, scikit-learn)."""

from __future__ import annotations

import numpy as np
import xarray as xr
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis
from scipy.stats import ortho_group
from sklearn.mixture import GaussianMixture
from sklearn.neighbors import NearestNeighbors
from xarray.tests import raise_if_dask_computes

from mace_ood.extract.store import LatentWriter
from mace_ood.score.calibrate import percentile_against
from mace_ood.score.compute import compute_scores
from mace_ood.score.kernels import knn_mean_distance
from mace_ood.score.latents import open_latents
from mace_ood.score.reference import fit_reference, procrustes_rotation, ridge_precision

N_FEATURES = 5


def rotated_seed_files(directory, base: np.ndarray, rotations: list[np.ndarray], shifts, sizes, noise=0.0, seed=0):
    """Seed files whose latents are the same points in rotated, shifted frames."""
    rng = np.random.default_rng(seed)
    paths = []
    for s, (rotation, shift) in enumerate(zip(rotations, shifts, strict=True)):
        latents = base @ rotation + shift + noise * rng.standard_normal(base.shape)
        path = directory / f"seed-{s}.nc"
        with LatentWriter(path, base.shape[1], "float64", chunk_atoms=32) as writer:
            start = 0
            for i, size in enumerate(sizes):
                writer.append(f"s{i}", "x.xyz", i, latents[start : start + size])
                start += size
        paths.append(path)
    return paths


def test_procrustes_recovers_a_known_rotation():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((500, N_FEATURES))
    rotation = ortho_group.rvs(N_FEATURES, random_state=2)
    q = procrustes_rotation(x @ rotation, x)
    np.testing.assert_allclose(q, rotation.T, atol=1e-10)


def test_aligned_variance_removes_the_seed_frames(tmp_path):
    rng = np.random.default_rng(3)
    sizes = [10, 30, 20, 40]
    reference_points = rng.standard_normal((100, N_FEATURES)) * [3, 2, 1, 0.5, 0.2]
    rotations = [np.eye(N_FEATURES)] + [ortho_group.rvs(N_FEATURES, random_state=r) for r in (4, 5)]
    shifts = [np.zeros(N_FEATURES), rng.standard_normal(N_FEATURES), rng.standard_normal(N_FEATURES)]
    ref_paths = rotated_seed_files(tmp_path / "ref", reference_points, rotations, shifts, sizes)
    eval_points = rng.standard_normal((100, N_FEATURES)) * 2
    eval_paths = rotated_seed_files(tmp_path / "eval", eval_points, rotations, shifts, sizes)
    with open_latents(ref_paths) as ref:
        reference = fit_reference(ref["latent"], gmm_components=(1,))
    with open_latents(eval_paths) as latents:
        scores = compute_scores(latents, reference).compute()
    assert scores["latent_variance"].min() > 0.1  # the raw variance sees only the frames
    np.testing.assert_allclose(scores["aligned_latent_variance"].values, 0, atol=1e-12)


def test_reference_scores_equal_independent_references(tmp_path):
    rng = np.random.default_rng(6)
    sizes = [7, 25, 3, 60, 5]
    n = sum(sizes)
    rotations = [np.eye(N_FEATURES), ortho_group.rvs(N_FEATURES, random_state=7)]
    shifts = [np.zeros(N_FEATURES), np.ones(N_FEATURES)]
    ref_paths = rotated_seed_files(tmp_path / "ref", rng.standard_normal((n, N_FEATURES)), rotations, shifts, sizes, noise=0.1)
    eval_paths = rotated_seed_files(tmp_path / "eval", 1.5 * rng.standard_normal((n, N_FEATURES)), rotations, shifts, sizes, noise=0.1, seed=1)
    with open_latents(ref_paths) as ref:
        reference = fit_reference(ref["latent"], knn_k=4, ridge=1e-3, gmm_components=(1, 2))
        ref_latents = ref["latent"].values
    with open_latents(eval_paths) as latents:
        with raise_if_dask_computes():
            lazy = compute_scores(latents, reference)
        scores = lazy.compute()
        z = latents["latent"].values
    per_atom = {name: [] for name in ("mahalanobis", "knn", "gmm")}
    for s in range(2):
        sample = ref_latents[s]
        cov = np.cov(sample, rowvar=False) + 1e-3 * np.trace(np.cov(sample, rowvar=False)) / N_FEATURES * np.eye(N_FEATURES)
        vi = np.linalg.inv(cov)
        per_atom["mahalanobis"].append([scipy_mahalanobis(row, sample.mean(axis=0), vi) for row in z[s]])
        distances, _ = NearestNeighbors(n_neighbors=4).fit(sample).kneighbors(z[s])
        per_atom["knn"].append(distances.mean(axis=1))
        gmm = reference.seeds[s].gmm
        assert isinstance(gmm, GaussianMixture)
        per_atom["gmm"].append(-gmm.score_samples(z[s]))
    np.testing.assert_allclose(scores["atom_mahalanobis"], np.mean(per_atom["mahalanobis"], axis=0), rtol=1e-8)
    np.testing.assert_allclose(scores["atom_knn_distance"], np.mean(per_atom["knn"], axis=0), rtol=1e-8)
    np.testing.assert_allclose(scores["atom_gmm_nll"], np.mean(per_atom["gmm"], axis=0), rtol=1e-8)
    bounds = np.cumsum([0, *sizes])
    expected = [np.mean(per_atom["knn"], axis=0)[a:b].mean() for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    np.testing.assert_allclose(scores["knn_distance"], expected, rtol=1e-8)


def test_each_block_of_reference_work_runs_once(tmp_path, monkeypatch):
    """The k-NN search (and the alignment, Mahalanobis and GMM beside it) runs once per block of
    atoms and seed, however many outputs it feeds: with dask's default task fusion it ran two to
    three times per block when the scores were written as a run writes them."""
    import mace_ood.score.compute as compute
    from mace_ood.score.evaluation import write_scores_netcdf

    rng = np.random.default_rng(12)
    sizes = [30] * 10  # 300 atoms in chunks of 32 (rotated_seed_files): 10 blocks
    rotations, shifts = [np.eye(N_FEATURES)] * 2, [np.zeros(N_FEATURES)] * 2
    ref_paths = rotated_seed_files(tmp_path / "ref", rng.standard_normal((300, N_FEATURES)), rotations, shifts, sizes, noise=0.1)
    eval_paths = rotated_seed_files(tmp_path / "eval", rng.standard_normal((300, N_FEATURES)), rotations, shifts, sizes, noise=0.1, seed=1)
    with open_latents(ref_paths) as ref:
        reference = fit_reference(ref["latent"], knn_k=3, gmm_components=(1,))
    searched_rows = []

    def counting_knn(query, *args, **kwargs):
        searched_rows.append(len(query))
        return knn_mean_distance(query, *args, **kwargs)

    monkeypatch.setattr(compute, "knn_mean_distance", counting_knn)
    with open_latents(eval_paths, chunk_atoms=32) as latents:
        scores = compute_scores(latents, reference)
        assert scores["atom_knn_distance"].data.numblocks == (10,)
        write_scores_netcdf(scores, tmp_path / "scores.nc")
    assert sum(searched_rows) == 2 * 300  # each atom of each of the 2 seeds searched once
    with xr.open_dataset(tmp_path / "scores.nc") as written:
        assert set(written.data_vars) >= {"knn_distance", "knn_distance_max", "descriptor", "gmm_nll_max"}


def test_knn_is_exact_across_chunks():
    rng = np.random.default_rng(8)
    query, reference = rng.standard_normal((300, 6)), rng.standard_normal((1000, 6))
    distances, _ = NearestNeighbors(n_neighbors=7).fit(reference).kneighbors(query)
    ours = knn_mean_distance(query, reference, 7, query_chunk=64, reference_chunk=100)
    np.testing.assert_allclose(ours, distances.mean(axis=1), rtol=1e-9)


def test_float32_knn_is_close_to_float64_on_offset_latents():
    """Latents with a large common offset and small spread: centring keeps float32 exact enough."""
    rng = np.random.default_rng(18)
    query, reference = 5 + 0.01 * rng.standard_normal((500, 32)), 5 + 0.01 * rng.standard_normal((3000, 32))
    distances, _ = NearestNeighbors(n_neighbors=10).fit(reference).kneighbors(query)
    ours = knn_mean_distance(query, reference, 10, query_chunk=128, reference_chunk=1000)
    assert np.max(np.abs(ours - distances.mean(axis=1)) / distances.mean(axis=1)) < 1e-9


def test_ridge_precision_is_the_regularised_inverse():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((50, 4))
    x[:, 3] = 0  # a dead channel: the ridge keeps the covariance invertible
    mean, precision = ridge_precision(x, 1e-2)
    cov = np.cov(x, rowvar=False)
    np.testing.assert_allclose(np.linalg.inv(precision), cov + 1e-2 * np.trace(cov) / 4 * np.eye(4), atol=1e-12)
    np.testing.assert_allclose(mean, x.mean(axis=0))


def test_percentiles_and_flags():
    reference = np.arange(1, 101, dtype=float)  # 1..100
    values = np.array([0.5, 1, 50, 99.5, 100, 250])
    np.testing.assert_allclose(percentile_against(values, reference), [0, 1, 50, 99, 100, 100])
    assert list(percentile_against(values, reference) > 99) == [False, False, False, False, True, True]
    assert np.isnan(percentile_against(values, np.array([np.nan]))).all()


def test_force_deviation_equals_numpy_on_a_tiny_model(tiny_models, tmp_path):
    import ase.io

    from mace_ood.config import ExtractionSettings
    from mace_ood.extract.runner import LatentExtractor
    from mace_ood.extract.stream import extract_to_netcdf
    from mace_ood.testing import random_structures

    structures = random_structures(4, seed=11)
    path = tmp_path / "s.xyz"
    ase.io.write(path, structures)
    structures = ase.io.read(path, ":")
    settings = ExtractionSettings(device="cpu", forces=True, chunk_atoms=64)
    files = [extract_to_netcdf(m, [str(path)], tmp_path / f"seed-{i}.nc", settings).path for i, m in enumerate(tiny_models["T1"])]
    with open_latents(files) as latents:
        scores = compute_scores(latents, None).compute()
    extractors = [LatentExtractor(m, "cpu", "float64", compute_forces=True) for m in tiny_models["T1"]]
    per_atom, maxima, energy_std, node_std = [], [], [], []
    for atoms in structures:
        outs = [e.outputs([e.graph(atoms)])[0] for e in extractors]
        forces = np.stack([o["forces"] for o in outs])
        deviation = np.sqrt(((forces - forces.mean(axis=0)) ** 2).sum(axis=-1).mean(axis=0))
        per_atom.append(deviation)
        maxima.append(deviation.max())
        energy_std.append(np.std([o["energy"] for o in outs]) / len(atoms))
        node_std.append(np.stack([o["node_energy"] for o in outs]).std(axis=0))
    np.testing.assert_allclose(scores["atom_force_deviation"], np.concatenate(per_atom), rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(scores["force_deviation_max"], maxima, rtol=1e-8)
    np.testing.assert_allclose(scores["force_deviation_mean"], [d.mean() for d in per_atom], rtol=1e-8)
    np.testing.assert_allclose(scores["energy_std_per_atom"], energy_std, rtol=1e-8)
    np.testing.assert_allclose(scores["atom_energy_std_per_atom"], np.concatenate(node_std), rtol=1e-8, atol=1e-14)
    assert scores["force_deviation_max"].attrs["units"] == "eV/Angstrom"
    assert scores["energy_std_per_atom"].attrs["units"] == "eV/atom"
    assert isinstance(scores, xr.Dataset)
