"""Score kernels: small pure functions over numpy blocks (seed, atom, feature) and per-atom arrays."""

from __future__ import annotations

import numpy as np


def seed_variance(block: np.ndarray) -> np.ndarray:
    """(S, n, F) -> (n,): mean over features of the across-seed population variance (ddof=0)."""
    return block.var(axis=0, dtype=np.float64).mean(axis=-1)


def knn_mean_distance(
    query: np.ndarray, reference: np.ndarray, k: int, query_chunk: int = 4096, reference_chunk: int = 32768,
    device: str = "cpu",
) -> np.ndarray:
    """Mean distance of each query row to its k nearest reference rows: exact, in bounded memory.

    The neighbours are found with torch ``cdist`` + ``topk`` in float32 over
    (query_chunk x reference_chunk) blocks, both sets centred on the reference mean, keeping a
    running k-best per query row (never an all-pairs matrix); the k distances are then
    recomputed in float64 from the rows themselves. float32 search is 1.7-2x faster than
    float64 on the CPU; the float64 recomputation keeps the result exact (a self-match is 0,
    not the ~1e-3 of float32 cancellation), so only an exact tie could pick another neighbour.
    """
    import torch

    k = min(k, len(reference))
    reference = np.asarray(reference, dtype=np.float64)
    centre = reference.mean(axis=0)
    reference_t = torch.as_tensor(reference - centre, dtype=torch.float32, device=device)
    out = np.empty(len(query))
    with torch.inference_mode():
        for q0 in range(0, len(query), query_chunk):
            q64 = np.asarray(query[q0 : q0 + query_chunk], dtype=np.float64)
            q = torch.as_tensor(q64 - centre, dtype=torch.float32, device=device)
            best_d = best_i = None
            for r0 in range(0, len(reference_t), reference_chunk):
                d = torch.cdist(q, reference_t[r0 : r0 + reference_chunk], compute_mode="use_mm_for_euclid_dist")
                index = torch.arange(r0, r0 + d.shape[1], device=device).expand(d.shape[0], -1)
                if best_d is not None:
                    d, index = torch.cat([best_d, d], dim=1), torch.cat([best_i, index], dim=1)
                best_d, where = torch.topk(d, k, dim=1, largest=False, sorted=False)
                best_i = torch.gather(index, 1, where)
            neighbours = reference[best_i.cpu().numpy()]  # (n, k, F), float64
            out[q0 : q0 + len(q64)] = np.linalg.norm(neighbours - q64[:, None, :], axis=-1).mean(axis=1)
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


