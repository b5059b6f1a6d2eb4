"""What a family's own training set looks like in latent space, per seed.

Fitted once per family on the latents of the family scoring its own training set, on a
random subsample of the atoms of the *fit* part of a group-level split (source file and block
of consecutive frames, :func:`split_structures`); the *calibration* part is never seen by the fit and is what percentiles, the ``ood`` threshold and
the combined score are calibrated on. Saved beside the latents; used by the
reference-based scores in :mod:`mace_ood.score.compute`.
"""

from __future__ import annotations

import hashlib
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
    calibration_ids: list[str] = field(default_factory=list)  # training structures held out of the fit
    gap_ids: list[str] = field(default_factory=list)  # neighbours of calibration frames: in neither part
    calibration_in_sample: bool = False  # too few structures to split: calibrated on fit data
    llpr: list | None = None  # per seed, mace_ood.score.llpr.SeedLLPR; None: the models do not support it

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


MIN_CALIBRATION_GROUPS = 2  # a calibration structure needs another group to be compared with
MIN_STRUCTURES_TO_SPLIT = 10
FIT, CALIBRATION, GAP = "fit", "calibration", "gap"


def split_groups(source_files: np.ndarray, frame_index: np.ndarray, block_frames: int) -> list[tuple[str, int]]:
    """Each structure's group: its source file (by name) and its block of ``block_frames``
    consecutive frames in that file. MD frames within a block are neighbours; whole blocks go
    to one side of the split."""
    names = [Path(str(f)).name for f in source_files]
    return [(name, int(i) // block_frames) for name, i in zip(names, np.asarray(frame_index), strict=True)]


def group_unit(group: tuple[str, int], seed: int) -> float:
    """A uniform number in [0, 1) fixed by the group's identity and the seed alone, so a group's side
    of the split does not change when other data is added."""
    digest = hashlib.sha256(f"{seed}\0{group[0]}\0{group[1]}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_structures(
    source_files: np.ndarray,
    frame_index: np.ndarray,
    calibration_fraction: float,
    seed: int,
    block_frames: int = 10,
    gap_frames: int = 1,
) -> np.ndarray:
    """Each structure's side: ``fit``, ``calibration`` or ``gap``.

    A group (:func:`split_groups`) is held out for calibration when its hash unit
    (:func:`group_unit`) is below ``calibration_fraction``: stable under appended data, and no
    calibration frame shares a block with a fit frame. Fit frames within ``gap_frames`` of a
    calibration frame of the same file are ``gap`` (used by neither side), so no calibration
    frame has a fit-frame neighbour in its trajectory. A calibration structure is compared with
    the *other* calibration groups, so at least ``MIN_CALIBRATION_GROUPS`` are held out: if the
    hash holds out fewer, the groups with the smallest units are (and if it holds out all, the
    largest is fitted on). With fewer than ``MIN_STRUCTURES_TO_SPLIT`` structures or at most
    ``MIN_CALIBRATION_GROUPS`` groups, everything is ``fit``: calibration is then in-sample, and
    said so.
    """
    n = len(source_files)
    side = np.full(n, FIT, dtype=object)
    groups = split_groups(source_files, frame_index, block_frames)
    distinct = list(dict.fromkeys(groups))
    if n < MIN_STRUCTURES_TO_SPLIT or len(distinct) <= MIN_CALIBRATION_GROUPS:
        return side
    unit = {group: group_unit(group, seed) for group in distinct}
    by_unit = sorted(distinct, key=unit.__getitem__)
    held = {group for group in distinct if unit[group] < calibration_fraction}
    held |= set(by_unit[:MIN_CALIBRATION_GROUPS])
    if len(held) == len(distinct):
        held.discard(by_unit[-1])
    side[[g in held for g in groups]] = CALIBRATION
    frames: dict[str, dict[int, str]] = {}
    for (name, _), frame, s in zip(groups, np.asarray(frame_index), side, strict=True):
        frames.setdefault(name, {})[int(frame)] = s
    for row, ((name, _), frame) in enumerate(zip(groups, np.asarray(frame_index), strict=True)):
        if side[row] == FIT and any(
            frames[name].get(int(frame) + d) == CALIBRATION for d in range(-gap_frames, gap_frames + 1) if d
        ):
            side[row] = GAP
    return side


CALIBRATION_SPLITS = (CALIBRATION, "fit+calibration")  # the latter: too few structures to split


def calibration_mask(reference_table) -> np.ndarray:
    """Rows of the family's own training set (a table with a ``split`` column) that the reference
    was not fitted on."""
    if "split" not in reference_table.columns:
        return np.ones(len(reference_table), dtype=bool)
    return reference_table["split"].isin(CALIBRATION_SPLITS).to_numpy()


def atom_rows(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Atom rows of structures starting at ``starts`` with ``counts`` atoms, concatenated in their
    order (vectorised: no Python loop over structures)."""
    starts, counts = np.asarray(starts, dtype=np.int64), np.asarray(counts, dtype=np.int64)
    if counts.size == 0:
        return np.zeros(0, dtype=np.int64)
    first_of_each = np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(starts, counts) + (np.arange(int(counts.sum()), dtype=np.int64) - first_of_each)


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
    atoms: np.ndarray | None = None,
) -> FamilyReference:
    """Fit per-seed reference statistics on a subsample of the reference latents.

    Parameters
    ----------
    latent
        (seed, atom, feature) latents of the family on its own training set (lazy is fine;
        only the sampled atoms are read).
    max_atoms
        Atoms sampled (the same atoms for every seed) for all statistics and k-NN.
    atoms
        The atom rows the fit may use (the fit part of the split); default all.
    """
    pool = np.arange(latent.sizes["atom"]) if atoms is None else np.asarray(atoms, dtype=np.int64)
    n_atoms = len(pool)
    index = pool[sample_atoms(n_atoms, max_atoms, seed)]
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
