"""The HPC path on a real scheduler: a one-node SLURM (`.ci/slurm up`, which CI runs before the suite).

Skipped, with the reason, where no SLURM answers; ``MACE_OOD_REQUIRE_SLURM=1`` (CI) makes that a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pandas as pd
import pytest
import yaml

from mace_ood.config import load_config


def _slurm_state() -> str | None:
    """Why no SLURM can run jobs here, or None when the node is up."""
    if shutil.which("sinfo") is None:
        return "no sinfo: no SLURM on this machine (`.ci/slurm up`, as root, starts a one-node one)"
    done = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    states = set(done.stdout.split())
    if done.returncode != 0 or not states & {"idle", "mix", "alloc"}:
        return f"sinfo: no node can run jobs ({done.stdout.strip() or done.stderr.strip()})"
    return None


@pytest.fixture(scope="module")
def slurm() -> None:
    reason = _slurm_state()
    if reason and os.environ.get("MACE_OOD_REQUIRE_SLURM") == "1":
        pytest.fail(f"MACE_OOD_REQUIRE_SLURM=1 but {reason}")
    if reason:
        pytest.skip(reason)


def slurm_config(work, **jobqueue) -> dict:
    config = yaml.safe_load((work / "config.yaml").read_text())
    config["dask"] = {"cluster": "slurm", "jobqueue": {
        "queue": "debug", "cores": 1, "processes": 1, "memory": "2GB", "walltime": "00:20:00",
        "min_jobs": 0, "max_jobs": 2, "log_directory": str(work / "slurm-logs"), **jobqueue}}
    config["output_dir"] = str(work / "slurm-run")
    return config


@pytest.mark.slow
def test_a_run_through_slurm_jobs_scores_like_a_local_run(slurm, finished_run, tmp_path):
    from mace_ood.flows.ood import ood_detection

    local, outcome = finished_run  # `mace-ood run --top-k 2` on a local cluster
    assert outcome.exit_code == 0, outcome.output
    work = tmp_path / "p"
    shutil.copytree(local, work, ignore=shutil.ignore_patterns("run"))
    config = slurm_config(work)
    config["select"]["top_k"] = 2  # as the local run's `--top-k 2`
    (work / "slurm.yaml").write_text(yaml.safe_dump(config))

    result = ood_detection(load_config(work / "slurm.yaml"))

    workers = {e["worker"] for e in result["extractions"]}
    assert workers and all(w.startswith("SLURMCluster") for w in workers), workers  # inside SLURM jobs
    assert list((work / "slurm-logs").glob("*.err")), "no job wrote a log: did any job run?"
    a = pd.read_csv(local / "run" / "scores.csv").drop(columns=["source_file"])
    b = pd.read_csv(work / "slurm-run" / "scores.csv").drop(columns=["source_file"])
    pd.testing.assert_frame_equal(a, b)


def test_validate_prints_the_job_script_and_refuses_a_missing_partition(slurm, project, tmp_path):
    from typer.testing import CliRunner

    from mace_ood.cli import app

    work = tmp_path / "p"
    shutil.copytree(project.parent, work)
    (work / "slurm.yaml").write_text(yaml.safe_dump(slurm_config(work)))
    shown = CliRunner().invoke(app, ["validate", str(work / "slurm.yaml")])
    assert shown.exit_code == 0, shown.output
    assert "job script (slurm, up to 2 jobs)" in shown.output and "#SBATCH -p debug" in shown.output

    (work / "missing.yaml").write_text(yaml.safe_dump(slurm_config(work, queue="gpu-nowhere")))
    refused = CliRunner().invoke(app, ["validate", str(work / "missing.yaml")])
    assert refused.exit_code == 2
    assert "SLURM has no partition 'gpu-nowhere' (sinfo lists: debug)" in refused.output

