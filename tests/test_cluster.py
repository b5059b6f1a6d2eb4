"""Beyond one machine: an existing Dask cluster (real scheduler and worker processes), and
batch-queue job scripts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import yaml

from mace_ood.cluster import ClusterError, check_cluster, jobqueue_kwargs
from mace_ood.config import DaskConfig, load_config
from tests.synthetic import free_port


def test_slurm_job_script_with_gpus():
    from dask_jobqueue import SLURMCluster

    config = DaskConfig(cluster="slurm", jobqueue={
        "queue": "gpu", "account": "proj42", "walltime": "04:00:00", "cores": 32, "memory": "240GB",
        "processes": 4, "gpus_per_job": 4, "job_script_prologue": ["module load cuda/12.4", "source ~/venvs/ood/bin/activate"],
    })
    kwargs = jobqueue_kwargs(config, "http://10.0.0.5:4200/api")
    kwargs["scheduler_options"] = {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}
    with SLURMCluster(**kwargs) as cluster:
        script = cluster.job_script()
    for line in ["#SBATCH -p gpu", "#SBATCH -A proj42", "#SBATCH -t 04:00:00", "#SBATCH --gres=gpu:4",
                 "module load cuda/12.4", "export PREFECT_API_URL=http://10.0.0.5:4200/api",
                 "#SBATCH --cpus-per-task=32", "export OMP_NUM_THREADS=8", "--nworkers 4", "--nthreads 1",
                 "--resources GPU=1"]:
        assert line in script, f"{line!r} not in the job script:\n{script}"


def test_pbs_job_script_books_cores_and_gpus():
    from dask_jobqueue import PBSCluster

    config = DaskConfig(cluster="pbs", jobqueue={"queue": "workq", "cores": 16, "memory": "64GB", "processes": 2, "gpus_per_job": 2})
    kwargs = jobqueue_kwargs(config, None)
    kwargs["scheduler_options"] = {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}
    with PBSCluster(**kwargs) as cluster:
        script = cluster.job_script()
    assert "#PBS -l select=1:ncpus=16:mem=64GB:ngpus=2" in script and "--nthreads 1" in script
    assert "--resources GPU=1" in script and "export OMP_NUM_THREADS=8" in script


def test_jobqueue_needs_no_address():
    with pytest.raises(ValueError, match="either `address` or `cluster`"):
        DaskConfig(cluster="slurm", address="tcp://x:1")


@pytest.fixture(scope="module")
def dask_cluster(prefect_server):
    """`dask scheduler` and two `dask worker` processes on 127.0.0.1 (one declares GPU=1)."""
    from prefect.settings import PREFECT_API_URL

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "OMP_NUM_THREADS": "1"}
    dask = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
    processes = [subprocess.Popen([*dask, "--host", "127.0.0.1", "--port", str(port), "--dashboard-address", "127.0.0.1:0"],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    worker = [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1", "--host", "127.0.0.1",
              "--dashboard-address", "127.0.0.1:0"]
    processes.append(subprocess.Popen([*worker, "--name", "gpu-worker", "--resources", "GPU=1"], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    processes.append(subprocess.Popen([*worker, "--name", "cpu-worker"], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    from distributed import Client

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with Client(address, timeout=5) as client:
                if len(client.scheduler_info()["workers"]) == 2:
                    break
        except OSError:
            pass
        time.sleep(0.5)
    yield address, processes
    for process in processes:
        process.kill()
        process.wait()


@pytest.mark.slow
def test_flow_runs_on_an_existing_cluster_like_locally(dask_cluster, finished_run, tmp_path):
    from mace_ood.flows.ood import ood_detection

    address, _ = dask_cluster
    local, outcome = finished_run  # `mace-ood run --top-k 2` on a local cluster
    assert outcome.exit_code == 0, outcome.output
    work = tmp_path / "p"
    shutil.copytree(local, work)
    config = yaml.safe_load((work / "config.yaml").read_text())
    config["dask"] = {"address": address}
    config["output_dir"] = str(work / "remote")
    config["select"]["top_k"] = 2
    (work / "remote.yaml").write_text(yaml.safe_dump(config))
    remote = ood_detection(load_config(work / "remote.yaml"))
    assert {e["worker"] for e in remote["extractions"]} == {"gpu-worker", "cpu-worker"}
    # reference fits and scores run on the worker processes too, not in the flow's process,
    # and give the same scores as scoring on a local cluster
    assert len(remote["scoring"]) == 4 and {s["worker"] for s in remote["scoring"]} <= {"gpu-worker", "cpu-worker"}
    # ... and equal to scoring in this process, from the same latents and reference
    from mace_ood.records import EvaluationPlan
    from mace_ood.score.evaluation import score_evaluation

    label = "MACE_T1__T2"
    seeds = tuple(str(p) for p in sorted((work / "remote" / "latents" / "MACE_T1" / "T2").glob("seed-*.nc")))
    here = score_evaluation(EvaluationPlan("MACE_T1", "T2", False, seeds), work / "in-process", 64,
                            str(work / "remote" / "reference" / "MACE_T1.pkl"))
    with xr.open_dataset(here) as a, xr.open_dataset(work / "remote" / "scores" / f"{label}.nc") as b:
        for name in ("mahalanobis", "knn_distance_max", "atom_gmm_nll", "descriptor"):
            if name in b:
                np.testing.assert_allclose(a[name].values, b[name].values, rtol=1e-12)
    a = pd.read_csv(local / "run" / "scores.csv").drop(columns=["source_file"])
    b = pd.read_csv(work / "remote" / "scores.csv").drop(columns=["source_file"])
    pd.testing.assert_frame_equal(a, b)


def test_cluster_checks_say_what_is_wrong(dask_cluster, tmp_path):
    from prefect.settings import PREFECT_API_URL

    address, _ = dask_cluster
    found = check_cluster(address, tmp_path / "out", PREFECT_API_URL.value(), need_gpu=True)
    assert found == {"workers": 2, "gpu_workers": 1}
    with pytest.raises(ClusterError, match="PREFECT_API_URL is"):
        check_cluster(address, tmp_path / "out", "http://127.0.0.1:1/api", need_gpu=False)
    # a flow without a server of its own gets the commands that fix it, not the name of a
    # temporary server that is gone after the run
    with pytest.raises(ClusterError) as error:
        check_cluster(address, tmp_path / "out", "http://127.0.0.1:1/api", need_gpu=False, temporary_server=True)
    message = str(error.value)
    assert "prefect server start --host 0.0.0.0 --port 4200" in message
    assert "export PREFECT_API_URL=http://" in message and "dask worker" in message
    with pytest.raises(ClusterError, match="cannot connect"):
        check_cluster(f"tcp://127.0.0.1:{free_port()}", tmp_path / "out", None, need_gpu=False, timeout=2)


def test_gpu_tasks_without_gpu_workers_are_refused(tmp_path):
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        with pytest.raises(ClusterError, match="no worker declares a GPU resource"):
            check_cluster(cluster.scheduler_address, tmp_path, None, need_gpu=True)


@pytest.mark.slow
def test_a_worker_killed_mid_run_does_not_change_the_result(big_project, tmp_path):
    """Dask reschedules the killed worker's task; its extraction resumes from the disk."""
    from prefect.settings import PREFECT_API_URL

    from mace_ood.flows.ood import ood_detection

    source, local = big_project
    work = tmp_path / "p"
    shutil.copytree(source, work)

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "OMP_NUM_THREADS": "1"}
    scheduler = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                                  "--port", str(port), "--dashboard-address", "127.0.0.1:0"],
                                 env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1", "--host", "127.0.0.1",
              "--dashboard-address", "127.0.0.1:0", "--no-nanny"]
    survivor = subprocess.Popen([*worker, "--name", "survivor"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    victim = subprocess.Popen([*worker, "--name", "victim"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        config = yaml.safe_load((work / "config.yaml").read_text())
        config["dask"] = {"address": address}
        config["output_dir"] = str(work / "remote")
        (work / "remote.yaml").write_text(yaml.safe_dump(config))
        import threading

        def kill_when_working() -> None:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if list((work / "remote" / "latents").rglob("*.progress.json")):
                    victim.kill()
                    return
                time.sleep(0.02)

        killer = threading.Thread(target=kill_when_working, daemon=True)
        killer.start()
        result = ood_detection(load_config(work / "remote.yaml"))
        killer.join(timeout=1)
        assert victim.poll() is not None  # it was killed during the run
        assert result["summary"]
        remote = pd.read_csv(work / "remote" / "scores.csv").drop(columns=["source_file"])
        pd.testing.assert_frame_equal(remote, local)
    finally:
        for process in (victim, survivor, scheduler):
            process.kill()
            process.wait()
