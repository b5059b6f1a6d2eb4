"""The ``diverse`` strategy: greedy farthest-point (MaxDist) picks among OOD candidates.

The training set is preloaded as already chosen, so each pick is far from both the data
the models have seen and the earlier picks. The distance is weighed with the score (among
equally novel structures, the less trusted one goes first) and with the candidate's local
density (information density, Settles & Craven 2008): a structure with many similar
candidates around it stands for more of the pool than an isolated one, so one broad but
sparse family (a hot MD run, whose every frame is far from every other) does not take the
whole batch. Cost O(N·K·d) for N candidates, K picks and d descriptor channels, plus
O(N·(T + m)·d) once against T training structures and an m-candidate density sample;
memory O(N) besides the descriptors.

Anchors: apax's ``bal`` MaxDist selection, the LCMD batch mode of Holzmüller et al.
(JMLR 2023), mace's FPS replay selection.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mace_ood.score.neighbours import knn


@dataclass
class DiversePicks:
    """Result of :func:`select_diverse`: indices into the candidates, in pick order, and per pick
    the distance to and index of the nearest training structure and its group size."""

    order: np.ndarray  # (K,) candidate indices
    nearest_training: np.ndarray  # (K,) index into the training descriptors (-1: no training set)
    nearest_training_distance: np.ndarray  # (K,)
    group_size: np.ndarray  # (K,) candidates whose nearest pick this is (the pick included)


def squared_norms(x: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", x, x)


def nearest(
    query: np.ndarray, reference: np.ndarray, block: int = 16384, reference_block: int = 65536, device: str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Index of and Euclidean distance to the nearest reference row, per query row
    (:func:`mace_ood.score.neighbours.knn`: exact, blocked, faiss where installed)."""
    if len(reference) == 0:
        return np.full(len(query), -1), np.full(len(query), np.inf)
    index, distance = knn(query, reference, 1, device, query_block=block, reference_block=reference_block)
    return index[:, 0], distance[:, 0]


def score_weights(scores: np.ndarray, score_weight: float) -> np.ndarray:
    """(1 - w) + w * (rank fraction of the score): 1 for the highest score, about 1 - w for the lowest."""
    n = len(scores)
    if n == 0:
        return np.zeros(0)
    ranks = np.empty(n)
    ranks[np.argsort(np.nan_to_num(scores, nan=-np.inf), kind="stable")] = np.arange(1, n + 1)
    return (1.0 - score_weight) + score_weight * ranks / n


def local_density(
    candidates: np.ndarray, k: int = 5, sample_size: int = 2000, seed: int = 0, device: str = "cpu",
) -> np.ndarray:
    """1 / (mean distance to the ``k`` nearest other candidates), neighbours taken from a seeded
    sample of ``sample_size`` candidates (all of them when there are fewer), relative to its median."""
    n = len(candidates)
    if n <= 1:
        return np.ones(n)
    sample = np.arange(n) if n <= sample_size else np.sort(np.random.default_rng(seed).choice(n, sample_size, replace=False))
    position = np.searchsorted(sample, np.arange(n))
    in_sample = (position < len(sample)) & (sample[np.minimum(position, len(sample) - 1)] == np.arange(n))
    itself = np.where(in_sample, position, -1)  # a candidate is not its own neighbour
    mean_distance = knn(candidates, candidates[sample], k, device, exclude=itself)[1].mean(axis=1)
    mean_distance = np.maximum(mean_distance, 1e-12 * max(float(np.median(mean_distance)), 1e-12))
    return np.median(mean_distance) / mean_distance


def select_diverse(
    candidates: np.ndarray,
    scores: np.ndarray,
    k: int,
    training: np.ndarray | None = None,
    score_weight: float = 0.5,
    density_weight: float = 0.0,
    density_k: int = 5,
    density_sample: int = 2000,
) -> DiversePicks:
    """Pick ``k`` candidates greedily, each maximising
    (distance to everything chosen) x score weight x local density ** ``density_weight``.

    Parameters
    ----------
    candidates
        (N, d) structure descriptors of the candidates.
    scores
        (N,) OOD score of each candidate (higher = less trusted).
    k
        Picks wanted; fewer when there are fewer candidates.
    training
        (T, d) descriptors of the training structures, preloaded as chosen.
    score_weight
        0: pure farthest-point; 1: the distance times the score's rank fraction.
    density_weight
        Exponent of the local density (0: none).
    """
    candidates = np.ascontiguousarray(candidates, dtype=np.float32)
    n = len(candidates)
    k = min(k, n)
    training = np.zeros((0, candidates.shape[1]), np.float32) if training is None else np.asarray(training, np.float32)
    nearest_training, training_distance = nearest(candidates, training)
    min_distance = training_distance.copy()  # to the closest chosen structure, training included
    weights = score_weights(np.asarray(scores, dtype=np.float64), score_weight)
    if density_weight and n > 1:
        weights = weights * local_density(candidates, density_k, density_sample) ** density_weight
    candidate_sq = squared_norms(candidates)
    order = np.empty(k, dtype=np.int64)
    owner = np.full(n, -1, dtype=np.int64)  # index into `order` of each candidate's nearest pick
    owner_distance = np.full(n, np.inf)
    for step in range(k):
        if step == 0 and not np.isfinite(min_distance).any():
            pick = int(np.argmax(weights))  # no training set: start from the highest score
        else:
            priority = np.where(np.isfinite(min_distance), min_distance, np.inf) * weights
            priority[order[:step]] = -np.inf
            pick = int(np.argmax(priority))
        order[step] = pick
        d2 = candidate_sq + candidate_sq[pick] - 2.0 * (candidates @ candidates[pick])
        distance = np.sqrt(np.maximum(d2, 0.0))
        distance[pick] = 0.0
        closer = distance < owner_distance
        owner[closer] = step
        owner_distance[closer] = distance[closer]
        np.minimum(min_distance, distance, out=min_distance)
    group_size = np.bincount(owner[owner >= 0], minlength=k) if k else np.zeros(0, dtype=np.int64)
    return DiversePicks(
        order=order,
        nearest_training=nearest_training[order],
        nearest_training_distance=training_distance[order],
        group_size=group_size,
    )
