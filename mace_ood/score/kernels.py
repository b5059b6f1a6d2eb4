"""Score kernels: small pure functions over numpy blocks (seed, atom, feature) and per-atom arrays."""

from __future__ import annotations

import numpy as np


def seed_variance(block: np.ndarray) -> np.ndarray:
    """(S, n, F) -> (n,): mean over features of the across-seed population variance (ddof=0)."""
    return block.var(axis=0, dtype=np.float64).mean(axis=-1)


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
    """sqrt((z - mean)^T P (z - mean)) per row."""
    centred = z - mean
    return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", centred, precision, centred), 0.0))


def force_deviation(block: np.ndarray) -> np.ndarray:
    """(S, n, 3) forces -> (n,) sqrt(mean_s ||F_s - mean F||^2)."""
    deviation = block - block.mean(axis=0, keepdims=True)
    return np.sqrt((deviation**2).sum(axis=-1).mean(axis=0))


def structure_max(per_atom: np.ndarray, atom_offset: np.ndarray, n_atoms: np.ndarray) -> np.ndarray:
    """Max of a per-atom array over each structure's contiguous atom range (eager)."""
    if len(per_atom) == 0:
        return np.zeros(len(n_atoms))
    return np.maximum.reduceat(per_atom, np.asarray(atom_offset, dtype=np.int64))


