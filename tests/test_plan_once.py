"""The run is planned once: the plan names each family's own and validation evaluation, the CLI's
plan is the one the flow runs, and the manifest says whether the run finished."""

from __future__ import annotations

import json
import shutil

import ase.io
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from mace_ood.cli import app


def test_the_plan_names_each_familys_own_and_validation_evaluation(project, tmp_path):
    from mace_ood.config import load_config
    from mace_ood.plan import plan_run
    from mace_ood.testing import random_structures

    work = tmp_path / "p"
    shutil.copytree(project.parent, work)
    labelled = random_structures(3, seed=5)
    for atoms in labelled:
        atoms.arrays["REF_forces"] = np.zeros((len(atoms), 3))
    ase.io.write(work / "valid.extxyz", labelled)
    config = yaml.safe_load((work / "config.yaml").read_text())
    config["datasets"]["V"] = ["valid.extxyz"]
    config["model_families"]["MACE_T1"]["validation"] = "V"
    (work / "config.yaml").write_text(yaml.safe_dump(config))

    plan = plan_run(load_config(work / "config.yaml"), count=False)

    assert {f: plan.own(f).dataset for f in plan.models} == {"MACE_T1": "T1", "MACE_T2": "T2"}
    assert all(plan.own(f).reference for f in plan.models)
    assert {f: (e.dataset, e.reference) for f, e in plan.validation().items()} == {"MACE_T1": ("V", False)}
    assert [e.label for e in plan.evaluations if e.validation] == ["MACE_T1__V"]
    latents = {job.out_path for job in plan.jobs}
    assert latents == {str(plan.paths.latent(j.family, j.dataset, j.seed)) for j in plan.jobs}


@pytest.mark.slow
def test_a_cli_run_plans_once_and_its_manifest_says_when_it_finished(finished_run, tmp_path, monkeypatch):
    """Each model file is unpickled once per run (the CLI's plan is the flow's); ``run.json`` says
    ``running`` until every stage is done, and ``open_run`` refuses a run that has not finished."""
    import mace_ood.plan
    from mace_ood.api import RunError, open_run

    work, result = finished_run
    assert result.exit_code == 0, result.output
    copy = tmp_path / "p"
    shutil.copytree(work, copy)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["output_dir"] = str(copy / "run")
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    status = copy / "run" / "run.json"
    status.write_text(json.dumps({**json.loads(status.read_text()), "status": "running"}))  # as a killed run leaves it
    with pytest.raises(RunError, match="run.json says 'running'"):
        open_run(copy / "run")

    described = []
    describe = mace_ood.plan.describe_model
    monkeypatch.setattr(mace_ood.plan, "describe_model", lambda path, *a: described.append(path) or describe(path, *a))
    again = CliRunner().invoke(app, ["run", str(copy / "config.yaml"), "--top-k", "2"])

    assert again.exit_code == 0, again.output
    assert described and len(described) == len(set(described)), described
    manifest = json.loads(status.read_text())
    assert manifest["status"] == "complete"
    own = {(e["family"], e["dataset"]) for e in manifest["evaluations"] if e["reference"]}
    assert own == {("MACE_T1", "T1"), ("MACE_T2", "T2")}
    assert open_run(copy / "run").config.output_dir == copy / "run"
