"""The select stage writes what it decided; reading it back gives the same numbers, and the numbers
are the conformal rule's (a brute-force count over the calibration rows)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mace_ood.config import ScoresConfig, SelectConfig
from mace_ood.records import EvaluationPlan
from mace_ood.score.evaluation import fit_family_reference, score_evaluation
from mace_ood.select.stage import select_run
from mace_ood.select.table import (
    MissingSelection,
    read_selection,
    read_selection_summary,
    write_selection,
)
from tests.synthetic import synthetic_latent_files


@pytest.fixture(scope="module")
def selected_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("select")
    scores = ScoresConfig(gmm_components=[1], split_block_frames=1)
    train_paths, _, _ = synthetic_latent_files(root / "latents" / "D", n_seeds=2, sizes=(5, 7, 3) * 6, seed=0)
    new_paths, _, _ = synthetic_latent_files(root / "latents" / "N", n_seeds=2, sizes=(4, 9, 6) * 4, seed=1)
    own = EvaluationPlan("F", "D", True, tuple(str(p) for p in train_paths))
    new = EvaluationPlan("F", "N", False, tuple(str(p) for p in new_paths))
    reference = fit_family_reference(own, root, scores)
    for evaluation in (own, new):
        score_evaluation(evaluation, root, 16, reference)
    select = SelectConfig(score="mahalanobis", combine=["mahalanobis"], alpha=0.5, top_k=4)
    records = select_run(root, [own, new], select, scores)
    return root, own, new, select, records


def test_pvalues_and_flags_written_are_the_conformal_count(selected_run):
    root, own, new, select, records = selected_run
    assert [r["label"] for r in records] == [own.label, new.label]
    training, decided = read_selection(root, own.label), read_selection(root, new.label)
    own_rows = training[training["split"] == "out-of-fold"]
    calibration = own_rows["mahalanobis"].to_numpy()
    runs = [own_rows.loc[own_rows["group"] == g, "mahalanobis"].to_numpy() for g in own_rows["group"].unique()]
    assert len(calibration) == len(training) and len(runs) >= 2
    # independent reference: each run counted once, p = (1 + sum over runs of its share >= x) / (G + 1), by a loop
    expected = [(1 + sum(np.mean(run >= x) for run in runs)) / (len(runs) + 1) for x in decided["mahalanobis"]]
    np.testing.assert_allclose(decided["mahalanobis_pvalue"], expected, rtol=1e-12)
    assert list(decided["ood"]) == [p <= select.alpha + 1e-12 for p in expected]
    assert list(decided["rank"]) == list(range(1, len(decided) + 1))
    assert decided["mahalanobis"].is_monotonic_decreasing
    picks = decided[decided["selected"].notna()].sort_values("selected")
    assert list(picks["selected"]) == list(range(1, min(4, len(decided)) + 1))
    assert (picks["nearest_training_id"].isin(training["structure_id"])).all()
    summary = read_selection_summary(root, new.label)
    assert summary["n_ood"] == int(decided["ood"].sum()) and summary["n_selected"] == len(picks)
    assert summary["n_calibration"] == len(calibration) and summary["n_groups"] == len(runs)


def test_decisions_read_back_exactly(tmp_path):
    table = pd.DataFrame({
        "family": ["F", "F", "F"], "dataset": ["D"] * 3, "reference": [False] * 3, "rank": [1, 2, 3],
        "structure_id": ["NA", "nan", "a.xyz@2"], "formula": ["Cu", "None", "Al"],
        "mahalanobis": [1 / 3, np.nan, 1e-300], "ood": [True, False, False],
        "selected": pd.array([1, pd.NA, 2], dtype="Int64"), "nearest_training_id": ["t1", np.nan, "t2"],
    })
    write_selection(table, {"n_ood": 1}, tmp_path, "F__D")
    back = read_selection(tmp_path, "F__D")
    assert list(back["structure_id"]) == ["NA", "nan", "a.xyz@2"] and list(back["formula"]) == ["Cu", "None", "Al"]
    assert back["mahalanobis"].iloc[0] == 1 / 3 and np.isnan(back["mahalanobis"].iloc[1])
    assert back["mahalanobis"].iloc[2] == 1e-300
    assert back["ood"].dtype == bool and list(back["selected"]) == [1, pd.NA, 2]
    assert list(back["nearest_training_id"]) == ["t1", "", "t2"]
    with pytest.raises(MissingSelection, match=r"F__X.csv: missing"):
        read_selection(tmp_path, "F__X")
