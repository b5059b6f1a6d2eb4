"""All OOD scores of one evaluation, per atom and per structure, lazily and block by block.

The seed arrays are stacked to (seed, atom, feature) and reduced block by block along
atoms (``map_blocks``), which streams the files in chunk-sized slabs; the per-structure
mean is a difference of a running sum at the structure boundaries, so nothing of size
(atoms x features) is ever held in memory.

Per atom, for S seeds with latents z_s (F channels):

- ``latent_variance``: mean_F Var_s z_s (the seed's formula; ddof=0). Seeds do not share a
  latent basis, so this partly measures how differently the seeds arranged their channels.
- ``aligned_latent_variance``: the same after mapping every seed to seed 0's frame,
  z'_s = (z_s - mu_s) Q_s, with Q_s the orthogonal Procrustes rotation fitted on the
  family's own training-set latents.
- ``mahalanobis``: mean_s sqrt((z_s - mu_s)^T P_s (z_s - mu_s)), P_s the inverse of the
  ridge-regularised reference covariance of seed s.
- ``knn_distance``: mean_s of the mean Euclidean distance to the k nearest reference atoms
  (exact, chunked: never an all-pairs matrix).
- ``gmm_nll``: mean_s of the negative log-likelihood under a Gaussian mixture fitted on
  seed s's reference latents (components by BIC).
- ``force_deviation``: sqrt(mean_s ||F_s - mean_s F_s||^2) (DP-GEN), when forces were stored.
- ``energy_std_per_atom``: per atom, the std over seeds of the atom's energy contribution.
- ``llpr``: mean_s of the atom-level last-layer prediction rigidity, sqrt(f^T (F_a^T F_a / N_a +
  varsigma^2 I)^-1 f) of the atom's readout features f (:mod:`mace_ood.score.llpr`); per structure
  also ``llpr_energy_std``, mean_s of alpha_s sqrt(f^T (F^T F + varsigma^2 I)^-1 f) with f summed over
  the structure's atoms: the energy's standard deviation in eV when alpha was calibrated.
- ``llpr_force_std``: LLPR propagated to the forces, mean_s sqrt(mean_xyz J^T (sum J J^T +
  varsigma^2 I)^-1 J) of the gradients J of the structure's summed readout features by the atom's
  position; only where the Jacobian was stored (a family of one model), unscaled.

Per structure: ``<score>`` is the mean over its atoms of each per-atom score and
``<score>_max`` the max (a vacancy or a surface is a few unusual atoms among many);
``force_deviation_mean``/``_max`` likewise; ``energy_std_per_atom`` is the std over seeds
of E_s / n_atoms. ``descriptor`` (structure, F) is the mean aligned latent (seed-averaged, in
seed 0's frame, whitened by seed 0's reference precision) of the structure's novel atoms, those whose ``mahalanobis`` is above the training
atoms' 99th percentile, or of its most novel atom where none is (:func:`novel_environment`):
what the diverse selection measures distances in.
"""

from __future__ import annotations

from typing import get_args

import dask.array as da
import numpy as np
import xarray as xr

from mace_ood.config import CombinedScoreName, ForceScoreName, LatentScoreName
from mace_ood.extract.store import STRUCTURE_FIELDS
from mace_ood.score.kernels import (
    force_deviation,
    knn_mean_distance,
    mahalanobis_distance,
    seed_variance,
    structure_max,
)
from mace_ood.score.reference import FamilyReference

LATENT_SCORES: tuple[str, ...] = get_args(LatentScoreName)
FORCE_SCORES: tuple[str, ...] = get_args(ForceScoreName)
COMBINED_SCORE: str = get_args(CombinedScoreName)[0]
ALL_SCORES = LATENT_SCORES + FORCE_SCORES + (COMBINED_SCORE,)
REFERENCE_SCORES = ("aligned_latent_variance", "mahalanobis", "knn_distance", "gmm_nll")
# Units of each per-atom score (the per-structure mean and max share them). Latents have no
# physical unit: "latent" is the unit of one latent channel.
UNITS = {
    "latent_variance": "latent^2", "aligned_latent_variance": "latent^2", "mahalanobis": "1",
    "knn_distance": "latent", "gmm_nll": "nat", "force_deviation": "eV/Angstrom",
    "energy_std_per_atom": "eV/atom", "combined": "1", "descriptor": "latent", "llpr": "1",
    "llpr_energy_std": "eV", "llpr_force_std": "1",
}


def units_of(name: str) -> str | None:
    """Units of a scores-file variable (``atom_<score>``, ``<score>``, ``<score>_max``, ``_mean``)."""
    base = name.removeprefix("atom_").removesuffix("_max").removesuffix("_mean")
    return UNITS.get(base)


def _reference_block(block: np.ndarray, reference: FamilyReference, device: str = "cpu") -> np.ndarray:
    """(S, n, F) latents -> (n, 4 + F): aligned variance, Mahalanobis, k-NN, GMM NLL, then the seed
    average of the aligned latents (z_s - mu_s) Q_s, whitened (:func:`whitening`): the descriptor's
    rows, one alignment for both."""
    block = np.asarray(block, dtype=np.float64)
    aligned = np.stack([(z - ref.mean) @ ref.rotation for z, ref in zip(block, reference.seeds, strict=True)])
    out = np.empty((block.shape[1], len(REFERENCE_SCORES) + block.shape[2]))
    out[:, 0] = seed_variance(aligned)
    out[:, 1] = np.mean([mahalanobis_distance(z, r.mean, r.precision) for z, r in zip(block, reference.seeds, strict=True)], axis=0)
    out[:, 2] = np.mean([knn_mean_distance(z, r.sample, reference.knn_k, device=device) for z, r in zip(block, reference.seeds, strict=True)], axis=0)
    if all(r.gmm is not None for r in reference.seeds):
        out[:, 3] = np.mean([-r.gmm.score_samples(z) for z, r in zip(block, reference.seeds, strict=True)], axis=0)
    else:
        out[:, 3] = np.nan
    out[:, len(REFERENCE_SCORES):] = aligned.mean(axis=0) @ whitening(reference)
    return out


def whitening(reference: FamilyReference) -> np.ndarray:
    """W with W W^T = seed 0's precision: distances between rows x W are Mahalanobis distances in seed
    0's frame, the metric that found the atoms novel (raw latent distances are set by the channels
    thermal motion moves most, and put an atom displaced by 0.9 A next to the hottest training atoms)."""
    return np.linalg.cholesky(reference.seeds[0].precision)


def _llpr_block(latent: np.ndarray, layers: np.ndarray | None, llpr: list) -> np.ndarray:
    """(S, n, F) latents and (S, n, L-1) layer energies -> (n, 1 + S*D): the seed-mean atom-level
    LLPR, then each seed's per-atom features (summed per structure afterwards)."""
    features = [seed.readout.features(np.asarray(z, dtype=np.float64), None if layers is None else layers[s])
                for s, (z, seed) in enumerate(zip(latent, llpr, strict=True))]
    atom = np.mean([seed.atom_score(f) for f, seed in zip(features, llpr, strict=True)], axis=0)
    return np.concatenate([atom[:, None], *features], axis=1)


def _llpr_structure_std(sums: np.ndarray, llpr: list) -> np.ndarray:
    width = llpr[0].readout.width
    return np.mean([seed.structure_std(sums[:, s * width : (s + 1) * width]) for s, seed in enumerate(llpr)], axis=0)


def llpr_scores(latents: xr.Dataset, llpr: list) -> dict[str, xr.DataArray]:
    """Lazy ``atom_llpr`` (atom) and ``llpr_energy_std`` (structure) of one evaluation."""
    data = latents["latent"].transpose("seed", "atom", "feature").data.rechunk({0: -1, 2: -1})
    layers = None
    if "layer_energy" in latents:
        layers = latents["layer_energy"].transpose("seed", "atom", "layer").data.rechunk({0: -1, 1: data.chunks[1], 2: -1})
    elif llpr[0].readout.n_earlier:
        return {}
    width = 1 + len(llpr) * llpr[0].readout.width
    combined = da.map_blocks(
        _llpr_block, data, layers, llpr, drop_axis=0, chunks=(data.chunks[1], (width,)), dtype=np.float64,
    )
    counts = latents["n_atoms"].values
    means = blockwise_structure_mean(combined[:, 1:], latents["atom_offset"].values, counts)
    sums = means * np.asarray(counts, dtype=np.float64)[:, None]
    std = da.map_blocks(_llpr_structure_std, sums.rechunk({1: -1}), llpr, drop_axis=1, dtype=np.float64)
    return {"atom": xr.DataArray(combined[:, 0], dims=("atom",)),
            "structure": xr.DataArray(std, dims=("structure",))}


def _llpr_force_block(jacobian: np.ndarray, llpr: list) -> np.ndarray:
    return np.mean([seed.atom_force_std(j) for j, seed in zip(jacobian, llpr, strict=True)], axis=0)


def llpr_force_scores(latents: xr.Dataset, llpr: list) -> xr.DataArray | None:
    """Lazy per-atom ``llpr_force_std`` where the Jacobian was stored and the reference inverted it."""
    if "llpr_force_jacobian" not in latents or any(seed.force_inverse is None for seed in llpr):
        return None
    data = latents["llpr_force_jacobian"].transpose("seed", "atom", "llpr_jacobian").data.rechunk({0: -1, 2: -1})
    return xr.DataArray(da.map_blocks(_llpr_force_block, data, llpr, drop_axis=(0, 2), dtype=np.float64),
                        dims=("atom",))


def atom_latent_variance(latent: xr.DataArray) -> xr.DataArray:
    """Per-atom mean over features of the across-seed variance, lazily (dims: atom)."""
    data = latent.transpose("seed", "atom", "feature").data
    data = data.rechunk({0: -1, 2: -1})
    per_atom = da.map_blocks(seed_variance, data, drop_axis=(0, 2), dtype=np.float64)
    return xr.DataArray(per_atom, dims=("atom",), name="atom_latent_variance")


def structure_mean(per_atom: xr.DataArray, atom_offset: np.ndarray, n_atoms: np.ndarray) -> xr.DataArray:
    """Mean of a 1-D per-atom array over each structure's contiguous atom range, lazily."""
    values = per_atom.data
    running = da.concatenate([da.zeros(1, dtype=values.dtype), da.cumsum(values)])
    starts = np.asarray(atom_offset, dtype=np.int64)
    stops = starts + np.asarray(n_atoms, dtype=np.int64)
    sums = running[stops] - running[starts]
    return xr.DataArray(sums / np.asarray(n_atoms), dims=("structure",))


def _block_sums(block: np.ndarray, start: int, structure_of_atom: np.ndarray) -> tuple[int, np.ndarray]:
    """Sums of a block's rows per structure: (index of its first structure, (k, F) sums)."""
    owners = structure_of_atom[start : start + len(block)]
    boundaries = np.flatnonzero(np.diff(owners)) + 1
    return int(owners[0]), np.add.reduceat(block, np.concatenate([[0], boundaries]), axis=0)


def _assemble_means(parts: list[tuple[int, np.ndarray]], n_atoms: np.ndarray, n_features: int) -> np.ndarray:
    sums = np.zeros((len(n_atoms), n_features))
    for first, block_sums in parts:
        sums[first : first + len(block_sums)] += block_sums  # a structure split by a block boundary adds twice
    return sums / np.asarray(n_atoms)[:, None]


def blockwise_structure_mean(per_atom: da.Array, atom_offset: np.ndarray, n_atoms: np.ndarray) -> da.Array:
    """Mean of an (atom, F) array over each structure, lazily, holding only one block and the
    (structure, F) result: unlike a running sum, nothing of size atoms x F is ever materialised."""
    import dask

    structure_of_atom = np.repeat(np.arange(len(n_atoms)), np.asarray(n_atoms))
    starts = np.concatenate([[0], np.cumsum(per_atom.chunks[0])[:-1]])
    blocks = per_atom.to_delayed().ravel()
    parts = [dask.delayed(_block_sums)(block, int(start), structure_of_atom)
             for block, start in zip(blocks, starts, strict=True)]
    means = dask.delayed(_assemble_means)(parts, n_atoms, per_atom.shape[1])
    return da.from_delayed(means, shape=(len(n_atoms), per_atom.shape[1]), dtype=np.float64)


def _block_argmax_rows(
    scores: np.ndarray, rows: np.ndarray, start: int, structure_of_atom: np.ndarray,
) -> tuple[int, np.ndarray, np.ndarray]:
    """Per structure piece of a block: its highest score and that atom's row of ``rows``."""
    owners = structure_of_atom[start : start + len(scores)]
    pieces = np.concatenate([[0], np.flatnonzero(np.diff(owners)) + 1, [len(scores)]])
    filled = np.nan_to_num(scores, nan=-np.inf)
    best = np.array([a + int(np.argmax(filled[a:b])) for a, b in zip(pieces[:-1], pieces[1:], strict=True)],
                    dtype=np.int64)
    return int(owners[0]), scores[best], rows[best]


def _assemble_argmax_rows(parts: list, n_structures: int, n_features: int) -> np.ndarray:
    best_score = np.full(n_structures, -np.inf)
    out = np.full((n_structures, n_features), np.nan)
    for first, piece_scores, piece_rows in parts:
        index = np.arange(first, first + len(piece_scores))
        better = ~(np.nan_to_num(piece_scores, nan=-np.inf) <= best_score[index])  # a block boundary: keep the higher
        out[index[better]] = piece_rows[better]
        best_score[index[better]] = np.nan_to_num(piece_scores[better], nan=-np.inf)
    return out


def blockwise_row_of_structure_max(
    per_atom_score: da.Array, per_atom_rows: da.Array, n_atoms: np.ndarray,
) -> da.Array:
    """Per structure, the row of ``per_atom_rows`` (atom, F) at the atom with the highest
    ``per_atom_score``, lazily, one block at a time (both arrays chunked alike along atoms)."""
    import dask

    structure_of_atom = np.repeat(np.arange(len(n_atoms)), np.asarray(n_atoms))
    starts = np.concatenate([[0], np.cumsum(per_atom_rows.chunks[0])[:-1]])
    score_blocks = per_atom_score.rechunk((per_atom_rows.chunks[0],)).to_delayed().ravel()
    row_blocks = per_atom_rows.to_delayed().ravel()
    parts = [dask.delayed(_block_argmax_rows)(scores, rows, int(start), structure_of_atom)
             for scores, rows, start in zip(score_blocks, row_blocks, starts, strict=True)]
    result = dask.delayed(_assemble_argmax_rows)(parts, len(n_atoms), per_atom_rows.shape[1])
    return da.from_delayed(result, shape=(len(n_atoms), per_atom_rows.shape[1]), dtype=np.float64)


def novel_environment(aligned: da.Array, mahalanobis: da.Array, threshold: float, atom_offset: np.ndarray,
                      n_atoms: np.ndarray) -> da.Array:
    """Per structure, the mean aligned latent of its novel atoms (Mahalanobis above ``threshold``),
    or of its most novel atom where none is: the environments that make it new, lazily.

    The diverse selection measures distances here. The structure's mean hid a defect (a vacancy
    barely moves the mean of 32 atoms), and one atom of a hot cell is a random thermal draw, so hot
    frames were all far from each other and took the batch; the mean over the novel atoms is the
    hot environment for every hot frame and the defect's neighbourhood for a defect."""
    novel = (mahalanobis > threshold).astype(np.float64)[:, None]
    both = da.concatenate([aligned * novel, novel], axis=1).rechunk({1: -1})
    sums = blockwise_structure_mean(both, atom_offset, n_atoms)
    width = aligned.shape[1]
    count = sums[:, width:]
    mean = sums[:, :width] / da.where(count > 0, count, 1.0)
    return da.where(count > 0, mean, blockwise_row_of_structure_max(mahalanobis, aligned, n_atoms))


def lazy_structure_max(per_atom: xr.DataArray, atom_offset: np.ndarray, n_atoms: np.ndarray) -> xr.DataArray:
    """Max of a 1-D per-atom array over each structure, lazily (one chunk of 8 bytes per atom)."""
    one_chunk = per_atom.data.rechunk(-1)
    return xr.DataArray(
        one_chunk.map_blocks(structure_max, atom_offset, n_atoms, chunks=(len(n_atoms),), dtype=np.float64),
        dims=("structure",),
    )


def _fold_reference_block(block: np.ndarray, atom_fold: np.ndarray, reference: FamilyReference,
                          device: str = "cpu") -> np.ndarray:
    """:func:`_reference_block` of training atoms, each by the reference fitted without its fold."""
    atom_fold = np.asarray(atom_fold).ravel()
    out = np.empty((block.shape[1], len(REFERENCE_SCORES) + block.shape[2]))
    for fold in np.unique(atom_fold):
        rows = atom_fold == fold
        out[rows, : len(REFERENCE_SCORES)] = _reference_block(
            block[:, rows], reference.fold_reference(int(fold)), device)[:, : len(REFERENCE_SCORES)]
    # the descriptor stays in the family's frame (the one new data are aligned to), not the fold's
    out[:, len(REFERENCE_SCORES):] = np.mean(
        [(np.asarray(z, dtype=np.float64) - r.mean) @ r.rotation for z, r in zip(block, reference.seeds, strict=True)],
        axis=0) @ whitening(reference)
    return out


def compute_scores(latents: xr.Dataset, reference: FamilyReference | None, device: str = "cpu",
                   atom_fold: np.ndarray | None = None) -> xr.Dataset:
    """Lazy per-atom (``atom_<score>``) and per-structure scores of one evaluation.

    ``latents`` comes from :func:`mace_ood.score.latents.open_latents` (it may carry ``forces``).
    Without a reference, only the reference-free scores are computed; with one seed (a family of
    one model), the across-seed scores (``COMMITTEE_SCORES``) are absent. ``atom_fold``: the
    family's own training set, each atom's fold (:mod:`mace_ood.score.reference`): its reference
    scores are then out of fold. Each block of the expensive per-atom work runs once, however many
    outputs it feeds.
    """
    import dask

    # dask's task fusion, decided as the graph is built, copies a task into every consumer it is
    # fused with: the reference block (alignment, Mahalanobis, k-NN search, GMM) feeds the per-atom
    # scores, their structure means and maxima and the descriptor, and ran two to three times per
    # block (tests/score/test_compute.py counts the rows searched)
    with dask.config.set({"optimization.fuse.active": False}):
        return _compute_scores(latents, reference, device, atom_fold)


def _compute_scores(latents: xr.Dataset, reference: FamilyReference | None, device: str,
                    atom_fold: np.ndarray | None) -> xr.Dataset:
    offsets = latents["atom_offset"].values
    counts = latents["n_atoms"].values
    committee = latents.sizes["seed"] >= 2  # one model: no across-seed scores (absent, not zero)
    out = xr.Dataset()
    per_atom = {"latent_variance": atom_latent_variance(latents["latent"])} if committee else {}
    if reference is not None:
        data = latents["latent"].transpose("seed", "atom", "feature").data.rechunk({0: -1, 2: -1})
        chunks = (data.chunks[1], (len(REFERENCE_SCORES) + data.shape[2],))
        if atom_fold is None:
            blocks = da.map_blocks(_reference_block, data, reference, device, drop_axis=0, chunks=chunks,
                                   dtype=np.float64)
        else:
            # (1, atom, 1): map_blocks aligns arrays by their trailing axes
            folds = da.from_array(np.asarray(atom_fold, dtype=np.int64)[None, :, None],
                                  chunks=((1,), data.chunks[1], (1,)))
            blocks = da.map_blocks(_fold_reference_block, data, folds, reference, device, drop_axis=0,
                                   chunks=chunks, dtype=np.float64)
        for i, name in enumerate(REFERENCE_SCORES):
            if committee or name != "aligned_latent_variance":
                per_atom[name] = xr.DataArray(blocks[:, i], dims=("atom",))
        out["descriptor"] = xr.DataArray(
            novel_environment(blocks[:, len(REFERENCE_SCORES):], blocks[:, 1],
                              getattr(reference, "novel_atom_threshold", np.nan), offsets, counts),
            dims=("structure", "descriptor_feature"))
    llpr = reference.llpr if reference is not None else None
    llpr_parts = llpr_scores(latents, llpr) if llpr else {}
    if llpr_parts:
        per_atom["llpr"] = llpr_parts["atom"]
        out["llpr_energy_std"] = llpr_parts["structure"]
    force_std = llpr_force_scores(latents, llpr) if llpr else None
    if force_std is not None:
        per_atom["llpr_force_std"] = force_std
    if "forces" in latents and committee:
        forces = latents["forces"].transpose("seed", "atom", "xyz").data.rechunk({0: -1, 2: -1})
        per_atom["force_deviation"] = xr.DataArray(
            da.map_blocks(force_deviation, forces, drop_axis=(0, 2), dtype=np.float64), dims=("atom",)
        )
    for name, values in per_atom.items():
        out[f"atom_{name}"] = values
        key = "force_deviation_mean" if name == "force_deviation" else name
        out[key] = structure_mean(values, offsets, counts)
        out[f"{name}_max"] = lazy_structure_max(values, offsets, counts)
    if "forces" in latents and committee:
        energy = latents["energy"].values  # (seed, structure): small
        out["energy_std_per_atom"] = ("structure", energy.std(axis=0) / counts)
        node_energy = latents["node_energy"].transpose("seed", "atom").data.rechunk({0: -1})
        out["atom_energy_std_per_atom"] = xr.DataArray(node_energy.std(axis=0), dims=("atom",))
    for name in STRUCTURE_FIELDS:
        out[name] = latents[name]
    for name in out.data_vars:
        if units_of(str(name)):
            out[name].attrs["units"] = units_of(str(name))
    return out


