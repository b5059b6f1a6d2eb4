"""A family of one model (a fine-tuned foundation model): every score that needs no second seed,
equal to that seed's own statistics inside a committee; the committee scores absent, not NaN."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import yaml
from typer.testing import CliRunner

from mace_ood.cli import app
from mace_ood.config import COMMITTEE_SCORES, ExtractionSettings, ScoresConfig, SelectConfig
from mace_ood.records import EvaluationPlan
from mace_ood.score.evaluation import fit_family_reference, score_evaluation
from mace_ood.score.kernels import mahalanobis_distance
from mace_ood.select.stage import select_run

runner = CliRunner()


def test_one_model_scores_equal_that_seed_inside_a_committee(tmp_path, tiny_models):
    import ase.io

    from mace_ood.extract.stream import extract_to_netcdf
    from mace_ood.testing import random_structures

    settings = ExtractionSettings(device="cpu", forces=True, chunk_atoms=64)
    scores = ScoresConfig(gmm_components=[1], split_block_frames=2)
    latents = {}
    for dataset, n, seed in (("D0", 14, 1), ("D1", 6, 2)):
        path = tmp_path / f"{dataset}.extxyz"
        ase.io.write(path, random_structures(n, seed=seed))
        latents[dataset] = [
            extract_to_netcdf(m, [str(path)], tmp_path / "latents" / dataset / f"seed-{i}.nc", settings).path
            for i, m in enumerate(tiny_models["T1"][:2])
        ]
    for family, seeds in (("C", slice(0, 2)), ("S", slice(0, 1))):
        out = tmp_path / family
        plans = [EvaluationPlan(family, d, d == "D0", tuple(latents[d][seeds])) for d in ("D0", "D1")]
        reference = fit_family_reference(plans[0], out, scores)
        for plan in plans:
            score_evaluation(plan, out, 64, reference)
        select_run(out, plans, SelectConfig(), scores)
    from mace_ood.score.reference import FamilyReference

    committee = FamilyReference.load(tmp_path / "C" / "reference" / "C.pkl")
    with xr.open_dataset(tmp_path / "S" / "scores" / "S__D1.nc") as single, \
            xr.open_dataset(latents["D1"][0]) as seed0:
        z = seed0["latent"].values.astype(np.float64)
        ref = committee.seeds[0]  # seed 0's statistics as the committee fitted them
        np.testing.assert_allclose(single["atom_mahalanobis"].values, mahalanobis_distance(z, ref.mean, ref.precision),
                                   rtol=1e-10)
        brute = np.sort(np.linalg.norm(z[:, None] - ref.sample[None], axis=-1), axis=1)[:, : committee.knn_k]
        np.testing.assert_allclose(single["atom_knn_distance"].values, brute.mean(axis=1), rtol=1e-9)
        np.testing.assert_allclose(single["atom_gmm_nll"].values, -ref.gmm.score_samples(z), rtol=1e-10)
        names = set(single.data_vars)
    assert not names & {*COMMITTEE_SCORES, "atom_latent_variance", "atom_force_deviation"}
    assert {"mahalanobis_max", "knn_distance", "gmm_nll_max", "descriptor"} <= names
    from mace_ood.select.table import read_selection, read_selection_summary

    table = read_selection(tmp_path / "S", "S__D1")
    assert not set(table.columns) & set(COMMITTEE_SCORES)
    assert set(table["combined_driver"]) == {"mahalanobis_max"}  # force_deviation_mean needs a committee
    assert read_selection_summary(tmp_path / "S", "S__D1")["combined_of"] == "mahalanobis_max"


@pytest.fixture
def single_project(project, tmp_path):
    work = tmp_path / "p"
    shutil.copytree(project.parent, work, ignore=shutil.ignore_patterns("run"))
    config = yaml.safe_load((work / "config.yaml").read_text())
    for family in config["model_families"].values():
        family["models"] = [family["models"][0].replace("seed*", "seed0")]
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    return work


def test_a_one_model_family_runs_end_to_end(single_project, prefect_server):
    validated = runner.invoke(app, ["validate", str(single_project / "config.yaml")])
    assert validated.exit_code == 0, validated.output
    assert "family MACE_T1: 1 model" in validated.output
    assert "not: the seed-variance and committee (force, energy) scores need 2 or more models" in validated.output
    result = runner.invoke(app, ["run", str(single_project / "config.yaml"), "--top-k", "2"])
    assert result.exit_code == 0, result.output
    scores = pd.read_csv(single_project / "run" / "scores.csv")
    assert not set(scores.columns) & set(COMMITTEE_SCORES)
    assert {"combined", "combined_pvalue", "mahalanobis_max", "knn_distance", "gmm_nll"} <= set(scores.columns)
    assert scores["combined"].notna().all()
    picks = scores[(scores.family == "MACE_T1") & (scores.dataset == "T2") & scores.selected.notna()]
    assert sorted(picks.selected) == [1, 2]


def test_a_committee_score_for_a_one_model_family_is_refused_up_front(single_project):
    config = yaml.safe_load((single_project / "config.yaml").read_text())
    config["select"]["score"] = "force_deviation_mean"
    (single_project / "config.yaml").write_text(yaml.safe_dump(config))
    result = runner.invoke(app, ["run", str(single_project / "config.yaml")])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error:") and "1 model; select.score 'force_deviation_mean' needs 2 or more" in lines[-1]
    assert not (single_project / "run" / "latents").exists()


@pytest.mark.parametrize(("n_models", "validation", "llpr_forces", "forces", "expected"), [
    (1, "T2", None, True, True),  # the default: a one-model family whose force error a validation set calibrates
    (1, None, None, True, False),  # nothing to calibrate it on: not worth 7.8x the extraction
    (1, "T2", False, True, False),
    (1, None, True, True, True),
    (4, "T2", True, True, False),  # a committee has its force deviation
    (1, None, True, False, False),  # no forces, no force Jacobian
])
def test_which_extractions_store_the_llpr_force_jacobian(single_project, n_models, validation, llpr_forces, forces,
                                                          expected):
    from mace_ood.config import config_from_dict
    from mace_ood.plan import stores_llpr_forces

    data = yaml.safe_load((single_project / "config.yaml").read_text())
    family = data["model_families"]["MACE_T1"]
    family.update({"validation": validation, "llpr_forces": llpr_forces})
    data["forces"] = forces
    if not forces:
        data["select"]["score"] = "mahalanobis_max"
    assert stores_llpr_forces(config_from_dict(data), "MACE_T1", n_models) is expected
