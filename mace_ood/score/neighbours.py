"""One exact nearest-neighbour kernel for the k-NN score, the diverse selection and its density.

:func:`knn` finds each query row's ``k`` nearest reference rows (Euclidean) in float32, with
both sets centred on the reference mean, then recomputes the ``k`` distances in float64 from the
rows themselves and sorts them. The search runs with faiss's exact ``IndexFlatL2`` where faiss
is installed (``faiss-cpu``; a GPU index on a CUDA device when the faiss build has one), else
with a torch ``cdist`` + ``topk`` kernel on the worker's device, blocked over both query and
reference rows (never an all-pairs matrix). Only an exact float32 tie can pick another neighbour
than a float64 brute force would; the distances returned are float64 either way.

Measured in ``benchmarks/all_scores.py`` (docs/benchmarks.md): faiss's exact search against the
torch kernel on the same rows.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Literal

import numpy as np

Backend = Literal["auto", "faiss", "torch"]


def faiss_available() -> bool:
    return importlib.util.find_spec("faiss") is not None


def knn(
    query: np.ndarray,
    reference: np.ndarray,
    k: int,
    device: str = "cpu",
    backend: Backend = "auto",
    exclude: np.ndarray | None = None,
    query_block: int = 16384,
    reference_block: int = 32768,
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (n, k) of and float64 distances (n, k) to each query row's ``k`` nearest reference rows,
    nearest first.

    ``exclude``: per query row, one reference row that is not its neighbour (itself, when the
    query rows are among the reference; -1 for none). ``k`` is capped at the number of reference
    rows available. ``backend``: ``auto`` takes faiss where it is installed, else torch (the
    environment variable ``MACE_OOD_KNN_BACKEND=torch`` or ``faiss`` decides instead).
    """
    reference64 = np.asarray(reference, dtype=np.float64)
    query = np.asarray(query)
    n, n_reference = len(query), len(reference64)
    k = min(k, n_reference - (1 if exclude is not None else 0))
    if n == 0 or k <= 0:
        return np.zeros((n, max(k, 0)), dtype=np.int64), np.zeros((n, max(k, 0)))
    centre = reference64.mean(axis=0)
    reference32 = np.ascontiguousarray(reference64 - centre, dtype=np.float32)
    wanted = k + (1 if exclude is not None else 0)
    search = _faiss_search if _use_faiss(backend) else _torch_search
    index = np.empty((n, k), dtype=np.int64)
    distance = np.empty((n, k))
    find = search(reference32, device, reference_block)
    for start in range(0, n, query_block):
        q64 = np.asarray(query[start : start + query_block], dtype=np.float64)
        found = find(np.ascontiguousarray(q64 - centre, dtype=np.float32), wanted)
        if exclude is not None:
            found = _drop(found, np.asarray(exclude[start : start + len(q64)]), k)
        d = _distances(reference64, found, q64)
        order = np.lexsort((found, d), axis=-1)  # by distance, ties by index
        index[start : start + len(q64)] = np.take_along_axis(found, order, axis=1)
        distance[start : start + len(q64)] = np.take_along_axis(d, order, axis=1)
    return index, distance


RECOMPUTE_ROWS = 512  # query rows per float64 recompute: (512, k, F) temporaries, not (16384, k, F)


def _distances(reference64: np.ndarray, found: np.ndarray, query64: np.ndarray) -> np.ndarray:
    """float64 distances of each query row to its ``found`` reference rows, a few rows at a time
    (one (16,384 x 10 x 128) difference array per search block took 0.42 s; these blocks, 0.05 s)."""
    d = np.empty(found.shape)
    for start in range(0, len(found), RECOMPUTE_ROWS):
        rows = slice(start, start + RECOMPUTE_ROWS)
        diff = reference64[found[rows]] - query64[rows, None, :]
        d[rows] = np.sqrt(np.einsum("ijk,ijk->ij", diff, diff))
    return d


TORCH_QUERY_BLOCK = 4096  # rows per cdist: 4096 x 32768 float32 distances is 512 MiB
BACKEND_ENV = "MACE_OOD_KNN_BACKEND"  # torch or faiss: what ``auto`` takes (default: faiss where installed)


def _use_faiss(backend: Backend) -> bool:
    if backend == "auto" and os.environ.get(BACKEND_ENV) in ("torch", "faiss"):
        backend = os.environ[BACKEND_ENV]
    if backend == "faiss" and not faiss_available():
        raise ImportError("backend 'faiss' needs faiss (pip install faiss-cpu)")
    return backend == "faiss" or (backend == "auto" and faiss_available())


def _drop(found: np.ndarray, exclude: np.ndarray, k: int) -> np.ndarray:
    """``k`` of the ``k + 1`` neighbours per row: without the excluded one, else without the last."""
    keep = found != exclude[:, None]
    keep[keep.all(axis=1), -1] = False
    return found[keep].reshape(len(found), k)


def _faiss_search(reference32: np.ndarray, device: str, reference_block: int):
    import faiss

    index = faiss.IndexFlatL2(reference32.shape[1])
    if device.startswith("cuda") and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        gpu = int(device.split(":")[1]) if ":" in device else 0
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), gpu, index)
    index.add(reference32)

    def find(query32: np.ndarray, k: int) -> np.ndarray:
        return index.search(query32, k)[1].astype(np.int64)

    return find


def _torch_search(reference32: np.ndarray, device: str, reference_block: int):
    import torch

    reference_t = torch.as_tensor(reference32, device=device)

    def find(query32: np.ndarray, k: int) -> np.ndarray:
        return np.concatenate([_block(query32[q0 : q0 + TORCH_QUERY_BLOCK], k)
                               for q0 in range(0, len(query32), TORCH_QUERY_BLOCK)])

    def _block(query32: np.ndarray, k: int) -> np.ndarray:
        q = torch.as_tensor(query32, device=device)
        best_d = best_i = None
        with torch.inference_mode():
            for r0 in range(0, len(reference_t), reference_block):
                d = torch.cdist(q, reference_t[r0 : r0 + reference_block], compute_mode="use_mm_for_euclid_dist")
                index = torch.arange(r0, r0 + d.shape[1], device=device).expand(d.shape[0], -1)
                if best_d is not None:
                    d, index = torch.cat([best_d, d], dim=1), torch.cat([best_i, index], dim=1)
                best_d, where = torch.topk(d, min(k, d.shape[1]), dim=1, largest=False, sorted=False)
                best_i = torch.gather(index, 1, where)
        return best_i.cpu().numpy()

    return find
