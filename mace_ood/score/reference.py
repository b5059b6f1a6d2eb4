"""What a family's own training set looks like in latent space, per seed, and out of fold.

Fitted once per family on the latents of the family scoring its own training set, on a random
subsample of its atoms. The training set's independent units are its groups (MD runs,
:mod:`mace_ood.runs`); the groups are dealt into K folds (one group per fold when there are few),
and every fold gets the reference fitted *without* it (:class:`FoldReference`: the same sampled
atoms less the fold's). Each training structure is scored with its fold's reference, so its score
is out of fold; new data are scored with the reference fitted on all groups (cross-conformal:
:mod:`mace_ood.score.conformal`). The fold statistics come from per-fold sums and scatter
matrices of the sampled atoms: one pass over them, a subtraction per fold.
"""

from __future__ import annotations

import hashlib
import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xarray as xr

from mace_ood.files import atomic_path
from mace_ood.score.kernels import mahalanobis_distance


@dataclass
class SeedReference:
    """Reference statistics of one seed's latent space."""

    mean: np.ndarray  # (F,)
    precision: np.ndarray  # (F, F), inverse of the ridge-regularised covariance
    rotation: np.ndarray  # (F, F), orthogonal: (z - mean) @ rotation lives in seed 0's frame
    sample: np.ndarray | None  # (R, F), reference atoms for k-NN (None in a fold: the family's sample less the fold)
    gmm: object | None = None  # sklearn GaussianMixture


@dataclass
class FoldReference:
    """The reference fitted without one fold's groups: per seed, mean, precision and rotation (the
    GMM is the family's: refitting it per fold costs K fits, and it is not in the default score)."""

    seeds: list[SeedReference]


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
    novel_atom_threshold: float = float("nan")  # seed-mean Mahalanobis above which an atom is novel (the descriptor)
    folds: list[FoldReference] = field(default_factory=list)
    sample_fold: np.ndarray | None = None  # (R,) the fold of each sampled atom
    structure_fold: dict[str, int] = field(default_factory=dict)  # training structure id -> fold
    structure_group: dict[str, str] = field(default_factory=dict)  # training structure id -> group (run)
    grouping: str = ""  # how the groups were found, in words (mace_ood.runs.Grouping.describe)
    grouping_notes: list[str] = field(default_factory=list)

    @property
    def n_groups(self) -> int:
        return len(set(self.structure_group.values()))

    def fold_reference(self, fold: int) -> FamilyReference:
        """The reference fitted without ``fold``, whole (its k-NN sample: the family's less the fold)."""
        keep = self.sample_fold != fold
        seeds = [SeedReference(f.mean, f.precision, f.rotation, full.sample[keep], full.gmm)
                 for f, full in zip(self.folds[fold].seeds, self.seeds, strict=True)]
        return FamilyReference(seeds, int(keep.sum()), self.knn_k, self.settings)

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
    return mean, precision_of(np.atleast_2d(np.cov(sample, rowvar=False, ddof=1)), ridge)


def precision_of(cov: np.ndarray, ridge: float) -> np.ndarray:
    scale = max(float(np.trace(cov)) / cov.shape[0], 1e-12)
    return np.linalg.inv(cov + ridge * scale * np.eye(cov.shape[0]))


def fold_references(samples: np.ndarray, sample_fold: np.ndarray, n_folds: int, ridge: float) -> list[FoldReference]:
    """Per fold, each seed's mean, precision and Procrustes rotation (to seed 0's frame) of the sampled
    atoms outside the fold, from per-fold sums, scatter and seed-0 cross-scatter matrices: equal to
    :func:`ridge_precision` and :func:`procrustes_rotation` refitted on those atoms (tested)."""
    shift = samples.mean(axis=1, keepdims=True)  # cancellation in scatter - n mean mean^T stays small
    x = samples - shift
    n_seeds, _, width = x.shape
    counts = np.bincount(sample_fold, minlength=n_folds).astype(np.float64)
    sums = np.zeros((n_folds, n_seeds, width))
    scatter = np.zeros((n_folds, n_seeds, width, width))
    cross = np.zeros((n_folds, n_seeds, width, width))
    for k in range(n_folds):
        rows = sample_fold == k
        for s in range(n_seeds):
            sums[k, s] = x[s, rows].sum(axis=0)
            scatter[k, s] = x[s, rows].T @ x[s, rows]
            cross[k, s] = x[s, rows].T @ x[0, rows]
    total_n, total_sums, total_scatter, total_cross = counts.sum(), sums.sum(0), scatter.sum(0), cross.sum(0)
    folds = []
    for k in range(n_folds):
        n = total_n - counts[k]
        if n < 2:
            raise ValueError(f"fold {k} leaves {int(n)} sampled atoms to fit on")
        means = (total_sums - sums[k]) / n
        seeds = []
        for s in range(n_seeds):
            m = means[s]
            cov = (total_scatter[s] - scatter[k, s] - n * np.outer(m, m)) / (n - 1)
            u, _, vt = np.linalg.svd(total_cross[s] - cross[k, s] - n * np.outer(m, means[0]))
            seeds.append(SeedReference(m + shift[s, 0], precision_of(cov, ridge), u @ vt, None))
        folds.append(FoldReference(seeds))
    return folds


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


NOVEL_ATOM_QUANTILE = 0.99  # of the training atoms' Mahalanobis: above it an atom's environment is new
MIN_GROUPS_OUT_OF_FOLD = 2  # one group: nothing to hold it out against, calibration is in-sample
FIT, OUT_OF_FOLD, IN_SAMPLE = "fit", "out-of-fold", "fit+calibration"


def split_groups(source_files: np.ndarray, frame_index: np.ndarray, block_frames: int) -> list[tuple[str, int]]:
    """Each structure's block group: its source file (by name) and its block of ``block_frames``
    consecutive frames in that file (where no better group is known: a validation file's halves)."""
    names = [Path(str(f)).name for f in source_files]
    return [(name, int(i) // block_frames) for name, i in zip(names, np.asarray(frame_index), strict=True)]


def group_unit(group: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by the group's name and the seed alone, so a group's fold
    does not change when other data is added."""
    digest = hashlib.sha256(f"{seed}\0{group}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


LLPR_CALIBRATION_SHARE = 0.2  # of the folds: LLPR (one fit, not per fold) calibrates its alpha on them


def llpr_calibration_folds(n_folds: int) -> int:
    """LLPR is fitted once, on the training runs outside folds 0 .. k-1, and calibrated on those
    (when the family has no validation dataset): k = ceil(0.2 K), at least 1."""
    return max(1, math.ceil(LLPR_CALIBRATION_SHARE * n_folds))


def assign_folds(groups: np.ndarray, n_folds: int, seed: int = 0) -> np.ndarray:
    """Each structure's fold (an int), whole groups per fold: every group its own fold when there are
    at most ``n_folds`` groups (leave one group out), else the groups dealt round-robin in the order of
    :func:`group_unit` (balanced in groups, stable under reordering). One group: all in fold 0."""
    groups = np.asarray(groups).astype(str)
    distinct = sorted(set(groups.tolist()), key=lambda g: (group_unit(g, seed), g))
    fold_of = {g: i % n_folds for i, g in enumerate(distinct)}
    return np.array([fold_of[g] for g in groups.tolist()], dtype=np.int64)


CALIBRATION_SPLITS = (OUT_OF_FOLD, IN_SAMPLE, "calibration")  # one group: in-sample; a run before folds: held out


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
    atom_fold: np.ndarray | None = None,
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
        The atom rows the fit may use; default all.
    atom_fold
        The fold of each atom of ``atoms`` (of every atom when ``atoms`` is None): the reference
        also gets one :class:`FoldReference` per fold, fitted on the sampled atoms outside it.
    """
    pool = np.arange(latent.sizes["atom"]) if atoms is None else np.asarray(atoms, dtype=np.int64)
    n_atoms = len(pool)
    chosen = sample_atoms(n_atoms, max_atoms, seed)
    index = pool[chosen]
    samples = np.asarray(latent.isel(atom=index).transpose("seed", "atom", "feature").values, dtype=np.float64)
    centred0 = samples[0] - samples[0].mean(axis=0)
    seeds = []
    for s, sample in enumerate(samples):
        mean, precision = ridge_precision(sample, ridge)
        rotation = procrustes_rotation(sample - mean, centred0)
        gmm = fit_gmm(sample, gmm_components, gmm_max_atoms, seed + s) if gmm_components else None
        seeds.append(SeedReference(mean, precision, rotation, sample, gmm))
    reference = FamilyReference(
        seeds, n_reference_atoms=int(n_atoms), knn_k=knn_k,
        settings={"max_atoms": max_atoms, "ridge": ridge, "gmm_components": list(gmm_components), "seed": seed},
    )
    sample_mahalanobis = np.mean([mahalanobis_distance(s.sample, s.mean, s.precision) for s in seeds], axis=0)
    reference.novel_atom_threshold = float(np.quantile(sample_mahalanobis, NOVEL_ATOM_QUANTILE))
    if atom_fold is not None:
        reference.sample_fold = np.asarray(atom_fold, dtype=np.int64)[chosen]
        n_folds = int(np.max(atom_fold)) + 1
        if n_folds >= MIN_GROUPS_OUT_OF_FOLD:
            reference.folds = fold_references(samples, reference.sample_fold, n_folds, ridge)
    return reference
