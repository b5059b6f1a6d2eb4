from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from mace_ood.evaluate import bootstrap_interval, roc_auc, spearman


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_scipy_and_sklearn(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(60)
    y = x + rng.standard_normal(60)
    x[:5] = x[5]  # ties
    labels = rng.random(60) > 0.6
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    assert roc_auc(x, labels) == pytest.approx(roc_auc_score(labels, x), abs=1e-12)


def test_degenerate_inputs_are_nan():
    assert np.isnan(roc_auc(np.arange(4.0), np.ones(4)))
    assert np.isnan(spearman(np.ones(5), np.arange(5.0)))


def test_bootstrap_interval_contains_the_estimate_and_keeps_strata():
    rng = np.random.default_rng(3)
    scores = np.concatenate([rng.normal(0, 1, 50), rng.normal(1, 1, 50)])
    labels = np.repeat([False, True], 50)
    low, high = bootstrap_interval(roc_auc, (scores, labels), 300, strata=labels)
    assert low < roc_auc(scores, labels) < high and 0.5 < low and high < 1.0


def test_bootstrap_resamples_whole_groups_of_correlated_frames():
    """Ten runs of ten identical frames hold ten observations, not a hundred: the group bootstrap's
    interval matches the row bootstrap over the ten distinct values; the row bootstrap over the
    copies is about sqrt(10) times too narrow."""
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal(10), rng.standard_normal(10)
    y = x + y
    copies, runs = np.repeat(np.arange(10), 10), np.repeat(np.arange(10), 10)
    width = lambda interval: interval[1] - interval[0]  # noqa: E731
    distinct = width(bootstrap_interval(spearman, (x, y), 2000, seed=1))
    grouped = width(bootstrap_interval(spearman, (x[copies], y[copies]), 2000, seed=1, groups=runs))
    by_row = width(bootstrap_interval(spearman, (x[copies], y[copies]), 2000, seed=1))
    assert grouped == pytest.approx(distinct, rel=0.2)
    assert by_row < 0.6 * grouped


def forces_run(tmp_path, tiny_models, validation=None, select=None):
    """A run directory by hand: tiny models with forces on a training set D0 and a dataset D1
    whose structures carry made-up REF_forces (so the error order is known)."""
    import ase.io

    from mace_ood.config import ExtractionSettings, ScoresConfig
    from mace_ood.extract.stream import extract_to_netcdf
    from mace_ood.records import EvaluationPlan
    from mace_ood.score.evaluation import fit_family_reference, score_evaluation
    from mace_ood.select.stage import select_run
    from mace_ood.testing import random_structures

    rng = np.random.default_rng(7)
    settings = ExtractionSettings(device="cpu", forces=True, chunk_atoms=64)
    evaluations = []
    for dataset, n, seed in (("D0", 12, 1), ("D1", 8, 2)):
        structures = random_structures(n, seed=seed)
        for atoms in structures:
            atoms.arrays["REF_forces"] = rng.normal(scale=rng.uniform(0.1, 3.0), size=(len(atoms), 3))
        path = tmp_path / f"{dataset}.extxyz"
        ase.io.write(path, structures)
        latent_paths = tuple(
            extract_to_netcdf(m, [str(path)], tmp_path / "latents" / dataset / f"seed-{i}.nc", settings).path
            for i, m in enumerate(tiny_models["T1"])
        )
        evaluations.append(EvaluationPlan("F", dataset, dataset == "D0", latent_paths,
                                          validation=(validation or {}).get("F") == dataset))
    scores = ScoresConfig(gmm_components=[1], split_block_frames=2)
    reference = fit_family_reference(evaluations[0], tmp_path, scores)
    for evaluation in evaluations:
        score_evaluation(evaluation, tmp_path, 64, reference)
    select_run(tmp_path, evaluations, select, scores=scores)
    return evaluations


def test_force_errors_are_joined_to_their_own_structures(tmp_path, tiny_models):
    """Regression: errors came back in file order and were assigned to rows sorted by rank."""
    import ase.io

    from mace_ood.evaluate import evaluate_run, evaluation_data

    evaluations = forces_run(tmp_path, tiny_models)
    data = evaluation_data(tmp_path)
    # independent reference: ensemble-mean forces read from the seed files, against REF_forces
    expected = {}
    for evaluation in evaluations:
        seeds = [xr.open_dataset(p) for p in evaluation.latent_paths]
        mean = np.mean([ds["forces"].values for ds in seeds], axis=0)
        ids, offsets = seeds[0]["structure_id"].values.astype(str), seeds[0]["atom_offset"].values
        for ds in seeds:
            ds.close()
        frames = ase.io.read(tmp_path / f"{evaluation.dataset}.extxyz", ":")
        for sid, offset, atoms in zip(ids, offsets, frames, strict=True):
            diff = mean[offset : offset + len(atoms)] - atoms.arrays["REF_forces"]
            expected[sid] = np.sqrt(np.mean(diff**2))
    got = dict(zip(data["structure_id"], data["force_rmse"], strict=True))
    with xr.open_dataset(tmp_path / "scores" / "F__D0.nc") as ds:
        split = dict(zip(ds["structure_id"].values.astype(str), ds["split"].values.astype(str), strict=True))
    held_out = {sid for sid, side in split.items() if side == "out-of-fold"}
    assert len(held_out) == len(split) > 0  # every training structure is scored out of fold: all are usable
    assert set(got) == set(data[data.dataset == "D1"]["structure_id"]) | held_out and len(got) == 8 + len(held_out)
    for sid, value in got.items():
        assert value == pytest.approx(expected[sid], rel=1e-9), sid
    # the test means something only if the score's rank order is not the file order
    d1 = data[data.dataset == "D1"]
    assert list(d1["structure_id"]) != list(d1.sort_values("latent_variance", ascending=False)["structure_id"])
    table = evaluate_run(tmp_path, n_resamples=20)
    assert set(table.columns) == {"family", "dataset", "score", "metric", "value", "ci_low", "ci_high", "n"}
    assert {"D1", "all"} <= set(table["dataset"])
    # the flag on what is in distribution (here the held-out D0 rows), counted independently
    d0 = data[data.dataset == "D0"]
    assert f"F on D0: {int(d0['ood'].sum())} of {len(d0)} flagged" in table.attrs["flag_note"]
    assert "alpha = 0.01" in table.attrs["flag_note"] and "D1" not in table.attrs["flag_note"]
    roc = table[(table.metric == "roc_auc_ood_vs_in_distribution") & (table.dataset == "D1")]
    assert set(roc["n"]) == {8 + len(held_out)}  # 8 OOD structures against the held-out training structures


def test_labels_file_overrides_per_structure(tmp_path):
    from mace_ood.evaluate import read_labels

    path = tmp_path / "labels.csv"
    path.write_text("structure_id,is_ood\na,true\nb,0\nc,FALSE\n")
    assert read_labels(path) == {"a": True, "b": False, "c": False}
    path.write_text("structure_id,ood\na,true\n")
    with pytest.raises(ValueError, match="is_ood"):
        read_labels(path)
    path.write_text("structure_id,is_ood\na,true\nb,0\na,false\n")  # was: the last one silently won
    with pytest.raises(ValueError, match="'a' is labelled more than once"):
        read_labels(path)


def test_labels_of_structures_in_no_evaluation_are_refused(tmp_path):
    """Regression: unknown ids were ignored without a word (a typo left every label unused)."""
    from mace_ood.config import ScoresConfig
    from mace_ood.evaluate import evaluation_data
    from mace_ood.records import EvaluationPlan
    from mace_ood.score.evaluation import fit_family_reference, score_evaluation
    from mace_ood.select.stage import select_run
    from tests.synthetic import synthetic_latent_files

    paths, _, sizes = synthetic_latent_files(tmp_path / "latents", n_seeds=2, sizes=(5, 7, 3) * 4)
    evaluation = EvaluationPlan("F", "D", True, tuple(str(p) for p in paths))
    scores = ScoresConfig(gmm_components=[1], split_block_frames=2)
    score_evaluation(evaluation, tmp_path, 16, fit_family_reference(evaluation, tmp_path, scores))
    select_run(tmp_path, [evaluation], scores=scores)
    every = [f"s{i}" for i in range(len(sizes))]  # every training row, scored out of fold: all usable
    labelled = evaluation_data(tmp_path, labels=dict.fromkeys(every, True))
    n = len(labelled)
    assert n == len(every) and labelled["ood_label"].all() and (labelled["split"] == "out-of-fold").all()
    assert labelled.attrs["labels_note"] == f"labels: {n} of {n} structure ids matched ({n} ood, 0 in distribution)"
    with pytest.raises(ValueError, match=r"1 structure id\(s\) are in no evaluation .* 's99'"):
        evaluation_data(tmp_path, labels={"s0": True, "s99": True})


def test_predicted_force_error_is_fitted_on_the_validation_set_and_its_coverage_reported(tmp_path, tiny_models):
    """D1 (reference forces, never trained on) as the family's validation set: every structure gets
    the power-law prediction, its conformal bound inside the validation range and a lower bound
    beyond it; evaluate counts the bound's coverage on the structures the model was not fitted on."""
    from mace_ood.config import SelectConfig
    from mace_ood.evaluate import evaluate_run, evaluation_data
    from mace_ood.select.table import read_selection, read_selection_summary

    forces_run(tmp_path, tiny_models, validation={"F": "D1"}, select=SelectConfig(error_level=0.5))
    d1, d0 = read_selection(tmp_path, "F__D1"), read_selection(tmp_path, "F__D0")
    model = read_selection_summary(tmp_path, "F__D0")["error_model"]
    assert model["score"] == "force_deviation_mean" and model["n_structures"] == int(d1["error_fit"].sum()) == 8
    for table in (d0, d1):
        ordered = table.sort_values("force_deviation_mean")
        assert ordered["predicted_force_rmse"].is_monotonic_increasing  # the power law keeps its input's order
        inside = ~table["force_rmse_is_lower_bound"].astype(bool)
        assert (table["force_deviation_mean"][inside] <= model["largest_input"]).all()
        np.testing.assert_allclose(table["force_rmse_upper"][inside], model["factor"] * table["predicted_force_rmse"][inside])
        assert table["force_rmse_upper"][~inside].isna().all()
    assert d1["error_fit"].all()  # every labelled validation structure serves both the map and the bound
    data = evaluation_data(tmp_path)
    usable = data[~data["error_fit"].fillna(False).astype(bool) & data["force_rmse"].notna()
                  & data["force_rmse_upper"].notna()]
    covered = usable["force_rmse"] <= usable["force_rmse_upper"]
    note = evaluate_run(tmp_path, n_resamples=10).attrs["error_note"]
    for dataset, part in covered.groupby(usable["dataset"]):
        assert f"F on {dataset}: upper bound covers {int(part.sum())} of {len(part)}" in note
    assert "F on D1: upper bound" not in note  # the validation set itself is not counted
