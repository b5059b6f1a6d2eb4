"""End to end through the CLI: Prefect flow, Dask workers, reports. Random-weight models."""

from __future__ import annotations

import shutil
from pathlib import Path

import ase.io
import numpy as np
import openpyxl
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from mace_ood.cli import app
from mace_ood.config import DEFAULT_SCORE
from mace_ood.extract.runner import LatentExtractor
from mace_ood.report.structures import safe_name
from mace_ood.structures import iter_structures

runner = CliRunner()


def test_pinned_sha256_is_accepted(project, tmp_path):
    from mace_ood.extract.models import sha256_of

    config = yaml.safe_load(project.read_text())
    models = sorted((project.parent / "models").glob("T1_seed*.model"))
    config["model_families"]["MACE_T1"]["models"] = [{"path": str(m), "sha256": sha256_of(m)} for m in models]
    path = project.parent / "pinned.yaml"
    path.write_text(yaml.safe_dump(config))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output


def test_validate_prints_the_plan(project):
    result = runner.invoke(app, ["validate", str(project)])
    assert result.exit_code == 0, result.output
    assert "family MACE_T1: 3 seeds" in result.output
    assert "evaluation MACE_T1 -> T2" in result.output
    assert "evaluation MACE_T2 -> T2 (reference)" in result.output
    assert "12 extraction job(s)" in result.output


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(colour="red"), "unknown key 'colour'"),
        (lambda c: c["datasets"].update(T2=["data/nothing/*.xyz"]), "matches no file"),
        (lambda c: (c["model_families"]["MACE_T1"].update(models=["models/T1_seed0.model"]),
                    c["select"].update(score="force_deviation_mean")), "1 model; select.score 'force_deviation_mean'"),
        (lambda c: c["model_families"]["MACE_T1"].update(validation="T2"), "validation dataset 'T2' has no reference forces"),
        (lambda c: c["model_families"]["MACE_T1"].update(validation="T1"), "is the training set"),
        (lambda c: c["model_families"]["MACE_T1"].update(validation="nope"), "unknown dataset 'nope'"),
        (lambda c: (c["model_families"]["MACE_T1"].update(validation="T2"), c.update(forces=False)),
         "needs the models' forces"),
        (lambda c: c["model_families"]["MACE_T1"].update(models=["config.yaml", "models/T1_seed1.model"]), "config.yaml"),
        (lambda c: c["model_families"]["MACE_T1"].update(
            models=[{"path": "models/T1_seed0.model", "sha256": "0" * 64}, "models/T1_seed1.model"]), "SHA-256 is"),
        (lambda c: c.update(output_dir="config.yaml/run"), "output directory is not writable"),
        (lambda c: c["model_families"]["MACE_T1"].update(models=[{"path": "models/T1_seed0.model", "sha256": "xyz"}]),
         "model_families.MACE_T1.models.0"),
    ],
)
def test_bad_input_is_one_line_naming_the_problem(project, tmp_path, edit, message):
    config = yaml.safe_load(project.read_text())
    edit(config)
    path = project.parent / f"bad_{tmp_path.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1 or "cuequivariance" in result.output


@pytest.mark.slow
def test_run_end_to_end(finished_run):
    work, result = finished_run
    assert result.exit_code == 0, result.output
    out = work / "run"
    assert "MACE_T1 -> T2" in result.output and "report_xlsx" in result.output

    for family, dataset in [("MACE_T1", "T2"), ("MACE_T2", "T1"), ("MACE_T1", "T1"), ("MACE_T2", "T2")]:
        for seed in range(3):
            assert (out / "latents" / family / dataset / f"seed-{seed}.nc").is_file()
    assert not list(out.rglob("*.partial"))

    scores = pd.read_csv(out / "scores.csv")
    for column in ["family", "dataset", "structure_id", "source_file", "frame_index", "n_atoms", "formula",
                   "latent_variance", "rank", "relaxation", "temperature_K"]:
        assert column in scores.columns
    t1_on_t2 = scores[(scores.family == "MACE_T1") & (scores.dataset == "T2")]
    assert len(t1_on_t2) == 5  # 4 frames + 1 CIF
    assert sorted(t1_on_t2["rank"]) == [1, 2, 3, 4, 5]
    assert list(t1_on_t2.sort_values(DEFAULT_SCORE, ascending=False)["rank"]) == [1, 2, 3, 4, 5]
    reference = scores[(scores.family == "MACE_T1") & (scores.dataset == "T1")]
    assert reference[f"{DEFAULT_SCORE}_percentile"].max() == 100.0
    assert t1_on_t2["ood"].dtype == bool

    # the score equals a plain numpy computation from the models themselves
    models = sorted((work / "models").glob("T1_seed*.model"))
    extractors = [LatentExtractor(m, "cpu", "float64") for m in models]
    files = [str(work / "data" / "T2" / "slab_CuAl_T600K.xyz"), str(work / "data" / "T2" / "cellrelaxed_Al4.cif")]
    expected = {}
    for ref, atoms in iter_structures(sorted(files)):
        stacked = np.stack([e(atoms) for e in extractors])
        expected[ref.structure_id] = stacked.var(axis=0).mean(axis=-1).mean()
    got = dict(zip(t1_on_t2.structure_id, t1_on_t2.latent_variance, strict=True))
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-9)

    top_dir = out / "top" / "MACE_T1__T2"
    cifs = sorted(top_dir.glob("*.cif"))
    assert len(cifs) == 2 and cifs[0].name.startswith("01_")
    picks = t1_on_t2[t1_on_t2.selected.notna()].sort_values("selected")
    assert list(picks.selected) == [1, 2]
    best = picks.iloc[0]
    atoms = ase.io.read(cifs[0], store_tags=True)
    assert len(atoms) == best.n_atoms and atoms.info["_mace_ood_selected"] == 1
    assert cifs[0].name == f"01_{safe_name(best.structure_id)}.cif"
    xyz = ase.io.read(sorted(top_dir.glob("*.extxyz"))[0])
    assert np.isclose(xyz.arrays["MACE_OOD_latent_variance"].mean(), best.latent_variance)
    assert xyz.info["MACE_OOD_selected"] == 1 and "MACE_OOD_nearest_training_id" in xyz.info

    book = openpyxl.load_workbook(out / "report.xlsx")
    assert {"summary", "MACE_T1__T2", "MACE_T2__T1", "skipped"} <= set(book.sheetnames)
    sheet = book["MACE_T1__T2"]
    header = [c.value for c in sheet[1]]
    assert header[:9] == ["family", "dataset", "reference", "rank", "selected", DEFAULT_SCORE,
                          f"{DEFAULT_SCORE}_pvalue", "ood", f"{DEFAULT_SCORE}_percentile"]
    assert "latent_variance" in header and "knn_distance" in header and "gmm_nll" in header
    assert sheet.freeze_panes == "A2" and sheet.max_row == 3
    assert sheet["F2"].value == pytest.approx(best[DEFAULT_SCORE])
    assert sheet["F2"].number_format == "0.00E+00" and sheet["G2"].number_format == "0.00E+00"
    assert sheet["I2"].number_format == "0.0"
    assert sheet["H2"].value in (True, False) and sheet["H2"].data_type == "b"  # TRUE/FALSE in Excel
    assert {"group_size", "nearest_training_id", "nearest_training_distance"} <= set(header)

    import gzip
    import json

    viewer = json.loads(gzip.open(out / "chemiscope" / "MACE_T1__T2.json.gz").read())
    assert len(viewer["structures"]) == 5
    assert {"latent PC1", "aligned_latent_variance", "atom latent_variance"} <= set(viewer["properties"])
    assert (out / "plots" / "MACE_T1__T2_latent_pca.png").stat().st_size > 1000

    skipped = pd.read_csv(out / "skipped.csv")
    iron = skipped[skipped.structure_id == "iron_Fe2"]
    assert set(iron.family) == {"MACE_T1", "MACE_T2"} and set(iron.seeds) == {"0,1,2"}
    assert "Fe" in iron.reason.iloc[0]
    assert book["skipped"].max_row == len(skipped) + 1

    # the Prefect UI gets a top-K table per evaluation and a markdown summary
    tables, summaries = result.artifacts["top-mace-t1-t2"], result.artifacts["mace-ood-summary"]
    assert tables and tables[0]["type"] == "table"
    rows = json.loads(tables[0]["data"]) if isinstance(tables[0]["data"], str) else tables[0]["data"]
    assert [r["structure_id"] for r in rows] == list(picks.structure_id)
    assert summaries and "MACE_T1 on T2" in summaries[0]["data"]

    # calibration and selection are their own stage: one task run per evaluation, whose decisions
    # the report rendered (the same numbers and picks in scores.csv)
    from mace_ood.select.table import read_selection

    select_runs = {f"select {f} on {d}" for f, d in [("MACE_T1", "T2"), ("MACE_T2", "T1"), ("MACE_T1", "T1"),
                                                     ("MACE_T2", "T2")]}
    runs = [r for r in result.task_runs if r["name"] in select_runs]
    assert {r["name"] for r in runs} == select_runs and all(r["completed"] for r in runs)
    decided = read_selection(out, "MACE_T1__T2").set_index("structure_id").loc[t1_on_t2.structure_id]
    for column in [DEFAULT_SCORE, f"{DEFAULT_SCORE}_pvalue", "latent_variance", "rank"]:
        np.testing.assert_array_equal(decided[column].to_numpy(), t1_on_t2[column].to_numpy())
    assert list(decided["ood"]) == list(t1_on_t2["ood"])
    assert list(decided["selected"].fillna(0)) == list(t1_on_t2["selected"].fillna(0))

    # a second run reuses every latent file (no forward pass) and gives the same scores
    again = runner.invoke(app, ["run", str(work / "config.yaml"), "--top-k", "2"])
    assert again.exit_code == 0, again.output
    pd.testing.assert_frame_equal(pd.read_csv(out / "scores.csv"), scores)

    # the built-in evaluation: natural labels of the cross-evaluation give a ROC-AUC per score
    evaluation = runner.invoke(app, ["evaluate", str(out), "--n-bootstrap", "50"])
    assert evaluation.exit_code == 0, evaluation.output
    table = pd.read_csv(out / "evaluation.csv")
    assert set(table["metric"]) == {"roc_auc_ood_vs_in_distribution"}  # no reference forces in this data
    assert {"latent_variance", "aligned_latent_variance", "mahalanobis", "knn_distance", "gmm_nll"} <= set(table["score"])
    assert table["value"].between(0, 1).all() and (out / "evaluation.png").is_file()
    assert "| aligned_latent_variance |" in evaluation.output


def test_evaluate_rejects_a_folder_that_is_not_a_run(tmp_path):
    result = runner.invoke(app, ["evaluate", str(tmp_path)])
    assert result.exit_code == 2 and "no scores" in result.output


@pytest.mark.slow
def test_notebook_runs_on_a_run_directory(finished_run, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    work, result = finished_run
    assert result.exit_code == 0, result.output
    notebook = Path(__file__).parents[1] / "notebooks" / "ood_latent.ipynb"
    monkeypatch.setenv("MACE_OOD_RUN_DIR", str(work / "run"))
    nb = nbformat.read(notebook, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(notebook.parent)}}).execute()
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # histograms + one PCA/GMM figure per cross-evaluation
    tables = [o for c in nb.cells for o in c.get("outputs", []) if "text/html" in o.get("data", {})]
    assert any("structure_id" in o["data"]["text/html"] for o in tables)


def test_config_labels_override_the_natural_ones(finished_run, tmp_path):
    import json

    from mace_ood.evaluate import evaluate_run

    work, result = finished_run
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    shutil.copytree(work / "run", run)
    natural = evaluate_run(run, n_resamples=10)
    config = json.loads((run / "run_config.json").read_text())
    config["ood_labels"] = {"T1": True, "T2": False}  # the opposite of MACE_T1's natural labels
    (run / "run_config.json").write_text(json.dumps(config))
    flipped = evaluate_run(run, n_resamples=10)
    a = natural[natural.family == "MACE_T1"].set_index("score")["value"]
    b = flipped[flipped.family == "MACE_T1"].set_index("score")["value"]
    np.testing.assert_allclose(a + b, 1.0)


@pytest.mark.slow
def test_rescoring_extracts_only_new_structures(finished_run, tmp_path):
    import ase.io

    from mace_ood.flows.ood import rescore_from_file
    from mace_ood.testing import random_structures

    work, result = finished_run
    assert result.exit_code == 0, result.output
    copy = tmp_path / "p"
    shutil.copytree(work, copy)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["output_dir"] = str(copy / "run")
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    data = copy / "data" / "T2" / "slab_CuAl_T600K.xyz"
    ase.io.write(data, ase.io.read(data, ":") + random_structures(3, seed=77))
    outcome = rescore_from_file(str(copy / "config.yaml"))
    on_t2 = [e for e in outcome["extractions"] if e["dataset"] == "T2"]
    assert len(on_t2) == 6 and all(e["computed_structures"] == 3 for e in on_t2)
    assert all(e["reused"] for e in outcome["extractions"] if e["dataset"] == "T1")
    scores = pd.read_csv(copy / "run" / "scores.csv")
    assert len(scores[(scores.family == "MACE_T1") & (scores.dataset == "T2")]) == 8
