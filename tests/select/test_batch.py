"""The select stage over a table: candidates, trust bound, fill-up, pick records."""

from __future__ import annotations

import numpy as np
import pandas as pd

from mace_ood.config import SelectConfig
from mace_ood.select.batch import select_structures


def table_of(scores, ood):
    frame = pd.DataFrame({"structure_id": [f"s{i}" for i in range(len(scores))], "combined": scores, "ood": ood})
    frame["rank"] = frame["combined"].rank(ascending=False, method="first").astype(int)
    return frame.sort_values("rank").reset_index(drop=True)


def test_fewer_candidates_than_k_are_filled_by_score_and_said():
    table = table_of([5.0, 4.0, 3.0, 2.0, 1.0], [True, True, False, False, False])
    descriptors = np.eye(5, dtype=np.float32)
    selection = select_structures(table, SelectConfig(top_k=4), descriptors, np.zeros((1, 5)), np.array(["t0"]))
    rows = selection.rows
    assert list(rows["selected"]) == [1, 2, 3, 4]
    assert set(rows["structure_id"][:2]) == {"s0", "s1"}  # the OOD candidates first
    assert list(rows["structure_id"][2:]) == ["s2", "s3"]  # then by score
    assert list(rows["ood"]) == [True, True, False, False]
    assert "only 2 of the 4" in selection.note and selection.n_candidates == 2
    assert set(rows["nearest_training_id"]) == {"t0"}
    np.testing.assert_allclose(rows["nearest_training_distance"], 1.0, rtol=1e-6)


def test_trust_bound_drops_broken_geometries():
    table = table_of([1e6, 4.0, 3.0], [True, True, True])
    selection = select_structures(table, SelectConfig(top_k=3, trust_max=100.0), np.eye(3), None, None)
    assert "s0" not in set(selection.rows["structure_id"]) and len(selection.rows) == 2


def test_top_strategy_and_own_training_set_rank_by_score():
    table = table_of([1.0, 3.0, 2.0], [False, True, True])
    for selection in (select_structures(table, SelectConfig(top_k=2, strategy="top"), np.eye(3)),
                      select_structures(table, SelectConfig(top_k=2), np.eye(3), reference=True)):
        assert selection.strategy == "top"
        assert list(selection.rows["structure_id"]) == ["s1", "s2"]
