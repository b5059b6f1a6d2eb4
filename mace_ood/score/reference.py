"""What a family's own training set looks like in latent space, per seed.

Fitted once per family on the latents of the family scoring its own training set (the
in-distribution reference), on a random subsample of atoms, and saved beside the
latents. Used by the reference-based scores in :mod:`mace_ood.score.compute`.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xarray as xr

from mace_ood.files import atomic_path


@dataclass
class SeedReference:
    """Reference statistics of one seed's latent space."""

    mean: np.ndarray  # (F,)
    precision: np.ndarray  # (F, F), inverse of the ridge-regularised covariance
    rotation: np.ndarray  # (F, F), orthogonal: (z - mean) @ rotation lives in seed 0's frame
    sample: np.ndarray  # (R, F), reference atoms for k-NN
    gmm: object | None = None  # sklearn GaussianMixture


@dataclass
class FamilyReference:
    seeds: list[SeedReference]
    n_reference_atoms: int
    knn_k: int
    settings: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            pickle.dump(self, handle)
        return Path(path)

    @staticmethod
    def load(path: str | Path) -> FamilyReference:
        with open(path, "rb") as handle:
            return pickle.load(handle)


def procrustes_rotation(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Orthogonal Q minimising ||source @ Q - target||_F (both already centred)."""
    u, _, vt = np.linalg.svd(source.T @ target)
    return u @ vt


def ridge_precision(sample: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """Mean and inverse of (covariance + ridge * mean variance * I)."""
    mean = sample.mean(axis=0)
    cov = np.cov(sample, rowvar=False, ddof=1)
    cov = np.atleast_2d(cov)
    scale = max(float(np.trace(cov)) / cov.shape[0], 1e-12)
    return mean, np.linalg.inv(cov + ridge * scale * np.eye(cov.shape[0]))


def fit_gmm(sample: np.ndarray, components: tuple[int, ...], max_atoms: int, seed: int):
    """A full-covariance Gaussian mixture, the number of components chosen by BIC."""
    from sklearn.mixture import GaussianMixture

    rng = np.random.default_rng(seed)
    if len(sample) > max_atoms:
        sample = sample[np.sort(rng.choice(len(sample), max_atoms, replace=False))]
    best, best_bic = None, np.inf
    for n in components:
        if n > len(sample) // 5:
            continue
        gmm = GaussianMixture(n, covariance_type="full", reg_covar=1e-4, random_state=seed, max_iter=200)
        gmm.fit(sample)
        bic = gmm.bic(sample)
        if bic < best_bic:
            best, best_bic = gmm, bic
    return best


def sample_atoms(n_atoms: int, max_atoms: int, seed: int) -> np.ndarray:
    if n_atoms <= max_atoms:
        return np.arange(n_atoms)
    return np.sort(np.random.default_rng(seed).choice(n_atoms, max_atoms, replace=False))


def fit_reference(
    latent: xr.DataArray,
    max_atoms: int = 20000,
    knn_k: int = 10,
    ridge: float = 1e-3,
    gmm_components: tuple[int, ...] = (1, 2, 4, 8),
    gmm_max_atoms: int = 5000,
    seed: int = 0,
) -> FamilyReference:
    """Fit per-seed reference statistics on a subsample of the reference latents.

    Parameters
    ----------
    latent
        (seed, atom, feature) latents of the family on its own training set (lazy is fine;
        only the sampled atoms are read).
    max_atoms
        Atoms sampled (the same atoms for every seed) for all statistics and k-NN.
    """
    n_atoms = latent.sizes["atom"]
    index = sample_atoms(n_atoms, max_atoms, seed)
    samples = np.asarray(latent.isel(atom=index).transpose("seed", "atom", "feature").values, dtype=np.float64)
    centred0 = samples[0] - samples[0].mean(axis=0)
    seeds = []
    for s, sample in enumerate(samples):
        mean, precision = ridge_precision(sample, ridge)
        rotation = procrustes_rotation(sample - mean, centred0)
        gmm = fit_gmm(sample, gmm_components, gmm_max_atoms, seed + s) if gmm_components else None
        seeds.append(SeedReference(mean, precision, rotation, sample, gmm))
    return FamilyReference(
        seeds, n_reference_atoms=int(n_atoms), knn_k=knn_k,
        settings={"max_atoms": max_atoms, "ridge": ridge, "gmm_components": list(gmm_components), "seed": seed},
    )
