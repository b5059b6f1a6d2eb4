"""The diverse pick: farthest-point in descriptor space, training set preloaded, weighed by score."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from mace_ood.select.diverse import nearest, score_weights, select_diverse


def clustered(n_clusters=7, per_cluster=40, d=16, spread=0.05, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, d)) * 3
    labels = np.repeat(np.arange(n_clusters), per_cluster)
    points = centres[labels] + rng.normal(scale=spread, size=(len(labels), d))
    return points, labels, centres


def test_every_cluster_is_covered_before_any_is_picked_twice():
    points, labels, _ = clustered()
    rng = np.random.default_rng(1)
    scores = rng.random(len(points))  # scores vary inside every cluster
    picks = select_diverse(points, scores, k=7 * 3)
    first = labels[picks.order[:7]]
    assert sorted(first) == list(range(7))
    # a top-by-score pick of the same size would not: it takes whatever scores highest
    top = labels[np.argsort(-scores)[:7]]
    assert len(set(top)) < 7


def test_training_set_is_preloaded_as_chosen():
    points, labels, centres = clustered(n_clusters=5)
    training = centres[:3] + 0.01  # clusters 0-2 are known
    picks = select_diverse(points, np.ones(len(points)), k=2, training=training)
    assert set(labels[picks.order]) == {3, 4}
    # nearest training structure and its distance, against scipy
    distances = cdist(points[picks.order], training)
    np.testing.assert_array_equal(picks.nearest_training, distances.argmin(axis=1))
    np.testing.assert_allclose(picks.nearest_training_distance, distances.min(axis=1), rtol=1e-4)


def test_group_sizes_count_the_candidates_each_pick_stands_for():
    points, labels, _ = clustered(n_clusters=4, per_cluster=25)
    picks = select_diverse(points, np.zeros(len(points)), k=4)
    assert picks.group_size.sum() == len(points)
    assert sorted(picks.group_size) == [25, 25, 25, 25]
    # brute force: each candidate belongs to its nearest pick
    owner = cdist(points, points[picks.order]).argmin(axis=1)
    np.testing.assert_array_equal(np.bincount(owner, minlength=4), picks.group_size)


def test_score_breaks_ties_between_equally_far_candidates():
    points = np.array([[0.0, 0.0], [10.0, 0.0], [-10.0, 0.0]])
    training = np.array([[0.0, 0.0]])
    picks = select_diverse(points, np.array([0.0, 1.0, 2.0]), k=1, training=training)
    assert picks.order[0] == 2


def test_greedy_matches_a_brute_force_loop():
    rng = np.random.default_rng(3)
    points = rng.normal(size=(60, 5))
    training = rng.normal(size=(10, 5))
    scores = rng.random(60)
    distances = cdist(points, points)
    np.fill_diagonal(distances, np.inf)
    knn = np.sort(distances, axis=1)[:, :5].mean(axis=1)
    weights = score_weights(scores, 0.5) * (np.median(knn) / knn)
    chosen, min_d = [], cdist(points, training).min(axis=1)
    for _ in range(12):
        priority = min_d * weights
        priority[chosen] = -np.inf
        pick = int(np.argmax(priority))
        chosen.append(pick)
        min_d = np.minimum(min_d, cdist(points, points[[pick]])[:, 0])
    picks = select_diverse(points, scores, k=12, training=training, density_weight=1.0)
    assert list(picks.order) == chosen


@pytest.mark.parametrize("reference_block", [5, 36, 37, 65536])
def test_nearest_is_exact(reference_block):
    """Blocked over queries and references (the training set no longer sets the memory)."""
    rng = np.random.default_rng(4)
    q, r = rng.normal(size=(100, 8)), rng.normal(size=(37, 8))
    index, distance = nearest(q, r, block=16, reference_block=reference_block)
    full = cdist(q, r)
    np.testing.assert_array_equal(index, full.argmin(axis=1))
    np.testing.assert_allclose(distance, full.min(axis=1), rtol=1e-10)


def test_fewer_candidates_than_k():
    picks = select_diverse(np.eye(3), np.ones(3), k=10)
    assert sorted(picks.order) == [0, 1, 2]


def test_density_sample_equals_full_density_when_large_enough():
    from mace_ood.select.diverse import local_density

    rng = np.random.default_rng(5)
    points = rng.normal(size=(300, 4)).astype(np.float32)
    full = local_density(points, k=3, sample_size=1000)
    distances = cdist(points, points)
    np.fill_diagonal(distances, np.inf)
    knn = np.sort(distances, axis=1)[:, :3].mean(axis=1)
    np.testing.assert_allclose(full, np.median(knn) / knn, rtol=1e-4)
    sampled = local_density(points, k=3, sample_size=100)  # fewer neighbours: same ordering, roughly
    assert np.corrcoef(sampled, full)[0, 1] > 0.6


def test_a_sparse_broad_family_does_not_take_the_whole_batch():
    """Three tight families and one broad, sparse one (like a hot MD run) of the same size."""
    rng = np.random.default_rng(6)
    centres = np.array([[10.0, 0, 0], [0, 10.0, 0], [0, 0, 10.0], [-10.0, -10.0, -10.0]])
    spreads = [0.3, 0.3, 0.3, 4.0]
    points = np.vstack([c + rng.normal(scale=s, size=(30, 3)) for c, s in zip(centres, spreads, strict=True)])
    family = np.repeat(np.arange(4), 30)
    plain = select_diverse(points, np.ones(120), k=30, training=np.zeros((1, 3)), density_weight=0.0)
    weighted = select_diverse(points, np.ones(120), k=30, training=np.zeros((1, 3)), density_weight=1.0)
    plain_counts = np.bincount(family[plain.order], minlength=4)
    counts = np.bincount(family[weighted.order], minlength=4)
    assert plain_counts[3] > 15  # farthest-point alone: mostly the broad one
    assert counts[3] < plain_counts[3] - 5 and (counts >= 3).all()
