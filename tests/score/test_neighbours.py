"""The one nearest-neighbour kernel: exact (equal to scikit-learn's brute force) with faiss and with
torch, blocked in both dimensions, and without a query's own row when asked."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.neighbors import NearestNeighbors

from mace_ood.score.neighbours import faiss_available, knn

BACKENDS = ["torch", pytest.param("faiss", marks=pytest.mark.skipif(not faiss_available(), reason="no faiss"))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("query_block", "reference_block"), [(16, 7), (64, 100), (10_000, 100_000)])
def test_knn_equals_sklearn_brute_force(backend, query_block, reference_block):
    rng = np.random.default_rng(3)
    query, reference = rng.standard_normal((150, 6)), 3 + rng.standard_normal((400, 6))
    expected_d, expected_i = NearestNeighbors(n_neighbors=5, algorithm="brute").fit(reference).kneighbors(query)
    index, distance = knn(query, reference, 5, backend=backend, query_block=query_block,
                          reference_block=reference_block)
    np.testing.assert_array_equal(index, expected_i)
    np.testing.assert_allclose(distance, expected_d, rtol=1e-12)
    assert distance.dtype == np.float64


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_query_that_is_in_the_reference_is_not_its_own_neighbour(backend):
    rng = np.random.default_rng(4)
    points = rng.standard_normal((80, 3))
    sample = np.arange(0, 80, 2)  # every other point is a reference row
    itself = np.where(np.arange(80) % 2 == 0, np.arange(80) // 2, -1)
    index, distance = knn(points, points[sample], 3, backend=backend, exclude=itself, query_block=32)
    brute = np.linalg.norm(points[:, None] - points[sample][None], axis=-1)
    brute[np.arange(0, 80, 2), np.arange(40)] = np.inf
    np.testing.assert_array_equal(index, np.argsort(brute, axis=1, kind="stable")[:, :3])
    np.testing.assert_allclose(distance, np.sort(brute, axis=1)[:, :3], rtol=1e-12)


def test_k_is_capped_by_the_reference():
    index, distance = knn(np.zeros((2, 2)), np.eye(2), 10, backend="torch")
    assert index.shape == distance.shape == (2, 2)
