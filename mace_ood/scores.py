"""All OOD scores of one evaluation, per atom and per structure, computed block by block.

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

Per structure: the mean over its atoms of each per-atom score, except ``force_deviation_max``
(the max) and ``energy_std_per_atom`` (std over seeds of E_s / n_atoms).
"""

from __future__ import annotations

import dask.array as da
import numpy as np
import xarray as xr

from mace_ood.reference import FamilyReference
from mace_ood.scoring import atom_latent_variance, structure_mean
from mace_ood.store import STRUCTURE_FIELDS

LATENT_SCORES = ("latent_variance", "aligned_latent_variance", "mahalanobis", "knn_distance", "gmm_nll")
FORCE_SCORES = ("force_deviation_max", "force_deviation_mean", "energy_std_per_atom")
ALL_SCORES = LATENT_SCORES + FORCE_SCORES
REFERENCE_SCORES = ("aligned_latent_variance", "mahalanobis", "knn_distance", "gmm_nll")


def knn_mean_distance(
    query: np.ndarray, reference: np.ndarray, k: int, query_chunk: int = 2048, reference_chunk: int = 8192
) -> np.ndarray:
    """Mean distance of each query row to its k nearest reference rows, exact, in bounded memory."""
    k = min(k, len(reference))
    query = np.asarray(query, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    reference_sq = np.einsum("ij,ij->i", reference, reference)
    out = np.empty(len(query))
    for q0 in range(0, len(query), query_chunk):
        q = query[q0 : q0 + query_chunk]
        q_sq = np.einsum("ij,ij->i", q, q)
        best = np.full((len(q), k), np.inf)
        for r0 in range(0, len(reference), reference_chunk):
            r = reference[r0 : r0 + reference_chunk]
            d2 = q_sq[:, None] + reference_sq[None, r0 : r0 + len(r)] - 2.0 * (q @ r.T)
            candidates = np.concatenate([best, np.maximum(d2, 0.0)], axis=1)
            best = np.partition(candidates, k - 1, axis=1)[:, :k]
        out[q0 : q0 + len(q)] = np.sqrt(best).mean(axis=1)
    return out


def mahalanobis_distance(z: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    centred = z - mean
    return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", centred, precision, centred), 0.0))


def _reference_block(block: np.ndarray, reference: FamilyReference) -> np.ndarray:
    """(S, n, F) latents -> (4, n): aligned variance, Mahalanobis, k-NN, GMM NLL."""
    block = np.asarray(block, dtype=np.float64)
    aligned = np.stack([(z - ref.mean) @ ref.rotation for z, ref in zip(block, reference.seeds, strict=True)])
    out = np.empty((4, block.shape[1]))
    out[0] = aligned.var(axis=0).mean(axis=-1)
    out[1] = np.mean([mahalanobis_distance(z, r.mean, r.precision) for z, r in zip(block, reference.seeds, strict=True)], axis=0)
    out[2] = np.mean([knn_mean_distance(z, r.sample, reference.knn_k) for z, r in zip(block, reference.seeds, strict=True)], axis=0)
    if all(r.gmm is not None for r in reference.seeds):
        out[3] = np.mean([-r.gmm.score_samples(z) for z, r in zip(block, reference.seeds, strict=True)], axis=0)
    else:
        out[3] = np.nan
    return out


def _force_deviation_block(block: np.ndarray) -> np.ndarray:
    """(S, n, 3) forces -> (n,) sqrt(mean_s ||F_s - mean F||^2)."""
    deviation = block - block.mean(axis=0, keepdims=True)
    return np.sqrt((deviation**2).sum(axis=-1).mean(axis=0))


def structure_max(per_atom: np.ndarray, atom_offset: np.ndarray, n_atoms: np.ndarray) -> np.ndarray:
    if len(per_atom) == 0:
        return np.zeros(len(n_atoms))
    return np.maximum.reduceat(per_atom, np.asarray(atom_offset, dtype=np.int64))


def compute_scores(latents: xr.Dataset, reference: FamilyReference | None) -> xr.Dataset:
    """Lazy per-atom (``atom_<score>``) and per-structure scores of one evaluation.

    ``latents`` comes from :func:`mace_ood.scoring.open_latents` (it may carry ``forces``).
    Without a reference, only the reference-free scores are computed.
    """
    offsets = latents["atom_offset"].values
    counts = latents["n_atoms"].values
    out = xr.Dataset()
    per_atom = {"latent_variance": atom_latent_variance(latents["latent"])}
    if reference is not None:
        data = latents["latent"].transpose("seed", "atom", "feature").data.rechunk({0: -1, 2: -1})
        blocks = da.map_blocks(
            _reference_block, data, reference, drop_axis=(0, 2), new_axis=0,
            chunks=((4,), data.chunks[1]), dtype=np.float64,
        )
        for i, name in enumerate(REFERENCE_SCORES):
            per_atom[name] = xr.DataArray(blocks[i], dims=("atom",))
    if "forces" in latents:
        forces = latents["forces"].transpose("seed", "atom", "xyz").data.rechunk({0: -1, 2: -1})
        per_atom["force_deviation"] = xr.DataArray(
            da.map_blocks(_force_deviation_block, forces, drop_axis=(0, 2), dtype=np.float64), dims=("atom",)
        )
    for name, values in per_atom.items():
        out[f"atom_{name}"] = values
        key = "force_deviation_mean" if name == "force_deviation" else name
        out[key] = structure_mean(values, offsets, counts)
    if "forces" in latents:
        per_atom_one_chunk = out["atom_force_deviation"].data.rechunk(-1)  # 1-D: 8 bytes per atom
        out["force_deviation_max"] = xr.DataArray(
            per_atom_one_chunk.map_blocks(structure_max, offsets, counts, chunks=(len(counts),), dtype=np.float64),
            dims=("structure",),
        )
        energy = latents["energy"].values  # (seed, structure): small
        out["energy_std_per_atom"] = ("structure", energy.std(axis=0) / counts)
        node_energy = latents["node_energy"].transpose("seed", "atom").data.rechunk({0: -1})
        out["atom_energy_std_per_atom"] = xr.DataArray(node_energy.std(axis=0), dims=("atom",))
    for name in STRUCTURE_FIELDS:
        out[name] = latents[name]
    return out


def percentile_against(values: np.ndarray, reference_values: np.ndarray) -> np.ndarray:
    """Percent of the reference distribution at or below each value (NaN without a reference)."""
    reference_values = np.sort(np.asarray(reference_values, dtype=float)[np.isfinite(reference_values)])
    if reference_values.size == 0:
        return np.full(len(values), np.nan)
    return 100.0 * np.searchsorted(reference_values, values, side="right") / reference_values.size
