"""The HPC path on a real scheduler: a one-node SLURM (`.ci/slurm up`, which CI runs before the suite).

Skipped, with the reason, where no SLURM answers; ``MACE_OOD_REQUIRE_SLURM=1`` (CI) makes that a failure.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess

import pandas as pd
import pytest
import yaml

from mace_ood.config import load_config
from tests.ports import listening_beyond_loopback, plain_client_gets_in


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


def probe_every_port(logs, run_dir, outcome: dict, modes: dict) -> None:
    """Once a worker has joined, try a plain client on every port the run's scheduler (this process)
    and its workers (in the SLURM jobs) listen on beyond loopback; note the modes of the run's
    credentials."""
    import contextlib
    import time

    import psutil

    deadline, ports = time.monotonic() + 240, {}
    while time.monotonic() < deadline and "worker" not in ports.values():
        time.sleep(0.2)
        ports = {port: "scheduler" for port in listening_beyond_loopback(psutil.Process())}
        jobs = job_ids(logs)
        for process in psutil.process_iter():  # the nanny and worker processes of the run's jobs
            with contextlib.suppress(psutil.Error):
                if process.environ().get("SLURM_JOB_ID") in jobs:
                    ports.update({port: "worker" for port in listening_beyond_loopback(process)})
    for path in [*run_dir.glob(".dask-credentials-*"), *run_dir.glob(".dask-credentials-*/*")]:
        modes[path.name] = oct(path.stat().st_mode & 0o777)
    for port, kind in sorted(ports.items()):
        outcome[f"{kind} {port}"] = plain_client_gets_in(port)


@pytest.mark.slow
def test_a_run_through_slurm_jobs_scores_like_a_local_run_and_lets_no_one_else_in(slurm, finished_run, tmp_path):
    import threading

    from mace_ood.flows.ood import ood_detection

    local, outcome = finished_run  # `mace-ood run --top-k 2` on a local cluster
    assert outcome.exit_code == 0, outcome.output
    work = tmp_path / "p"
    shutil.copytree(local, work, ignore=shutil.ignore_patterns("run"))
    config = slurm_config(work)
    config["select"]["top_k"] = 2  # as the local run's `--top-k 2`
    (work / "slurm.yaml").write_text(yaml.safe_dump(config))
    probed: dict[str, bool] = {}
    modes: dict[str, str] = {}
    prober = threading.Thread(target=probe_every_port, args=(work / "slurm-logs", work / "slurm-run", probed, modes),
                              daemon=True)
    prober.start()

    console: list[str] = []  # what the flow's logger prints (Prefect's console handler hangs on the same logger)
    listener = logging.Handler()
    listener.emit = lambda record: console.append(record.getMessage())
    logging.getLogger("prefect.flow_runs").addHandler(listener)
    try:
        result = ood_detection(load_config(work / "slurm.yaml"))
    finally:
        logging.getLogger("prefect.flow_runs").removeHandler(listener)

    prober.join(timeout=180)
    console = "\n".join(console)  # the jobs' task logs are in their .err files: the flow says what finished
    n_jobs = len(result["extractions"])
    assert f"finished ({n_jobs} of {n_jobs} extraction(s))" in console and "finished (4 of 4 scoring(s))" in console
    assert any(k.startswith("scheduler") for k in probed) and any(k.startswith("worker") for k in probed), probed
    assert not any(probed.values()), f"a plain client got in: {probed}"
    directories = [name for name in modes if name.startswith(".dask-credentials-")]
    assert len(directories) == 1 and modes[directories[0]] == "0o700", modes
    assert len(modes) > 1 and all(mode == "0o600" for name, mode in modes.items() if name not in directories), modes
    assert not list((work / "slurm-run").glob(".dask-credentials-*")), "the run's credentials were left"
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



def job_ids(log_directory) -> set[str]:
    """The SLURM jobs of one run: dask-jobqueue names each job's log ``dask-worker-<job id>.err``."""
    return {path.stem.rsplit("-", 1)[-1] for path in log_directory.glob("*.err")}


@pytest.mark.slow
def test_a_job_cancelled_mid_extraction_is_replaced_and_its_work_resumes(slurm, big_project, tmp_path):
    """``scancel`` is what a walltime does to a job: its worker dies mid-extraction, the adaptive scaling
    submits another job, and the extraction resumes there from its durable progress."""
    import threading
    import time

    from mace_ood.flows.ood import ood_detection
    from tests.test_interrupt import has_durable_progress

    source, uninterrupted = big_project
    work = tmp_path / "p"
    shutil.copytree(source, work)
    config = slurm_config(work, max_jobs=1)
    (work / "slurm.yaml").write_text(yaml.safe_dump(config))
    run_dir, logs = work / "slurm-run", work / "slurm-logs"
    cancelled: list[str] = []

    def cancel_when_durable() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not has_durable_progress(run_dir):
            time.sleep(0.05)
        cancelled.extend(sorted(job_ids(logs)))
        subprocess.run(["scancel", *cancelled], check=False, timeout=30)

    canceller = threading.Thread(target=cancel_when_durable, daemon=True)
    canceller.start()
    result = ood_detection(load_config(work / "slurm.yaml"))
    canceller.join(timeout=5)

    assert cancelled, "no job was running when the extraction's progress became durable"
    assert job_ids(logs) - set(cancelled), "no job replaced the cancelled one"
    resumed = sum(e["resumed_structures"] for e in result["extractions"] if e["dataset"] == "T2")
    assert resumed > 0, "nothing resumed: the cancelled job's durable work was lost"
    scores = pd.read_csv(run_dir / "scores.csv").drop(columns=["source_file"])
    pd.testing.assert_frame_equal(scores, uninterrupted)


@pytest.mark.slow
def test_a_job_that_fails_before_its_worker_starts_ends_the_run_in_one_line(slurm, project, tmp_path):
    """A prologue that fails (a missing module, a wrong path) ends the job before any Dask worker
    starts: ``mace-ood run`` stops with the job's own error, in one line, instead of waiting for workers."""
    import signal
    import sys
    import time

    work = tmp_path / "p"
    shutil.copytree(project.parent, work)
    config = slurm_config(work, job_script_prologue=["echo 'module: cuda/12.4: not found' >&2", "exit 3"])
    (work / "slurm.yaml").write_text(yaml.safe_dump(config))

    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "mace_ood.cli", "run", str(work / "slurm.yaml")], cwd=work,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"the run still waited for workers {time.monotonic() - started:.0f} s after it started: {process.communicate()}")
    took = time.monotonic() - started

    assert process.returncode == 2, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    assert "ended (FAILED) before its Dask worker started: module: cuda/12.4: not found" in errors[0], errors[0]
    assert not stderr.split(errors[0])[-1].strip(), f"printed after the error:\n{stderr[-3000:]}"
    assert took < 120, f"the failed job was reported {took:.0f} s after the start"  # docs/tutorials/slurm.md
    queued = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
    assert not set(queued) & job_ids(work / "slurm-logs"), "the run left jobs in the queue"


def _running_jobs(job_name_ids: set[str]) -> set[str]:
    done = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=30)
    return set(done.stdout.split()) & job_name_ids if job_name_ids else set(done.stdout.split())


@pytest.mark.slow
def test_the_adaptive_scale_submits_jobs_for_waiting_tasks_and_releases_them_when_idle(slurm, project, tmp_path):
    """``min_jobs: 0``, ``max_jobs: 2``: the run's cluster submits jobs while tasks wait and cancels them
    once it is idle, before the run ends (a walltime-long job held idle costs the user's allocation)."""
    import gc
    import sys

    work = tmp_path / "p"
    shutil.copytree(project.parent, work)
    (work / "slurm.yaml").write_text(yaml.safe_dump(slurm_config(work)))
    config = load_config(work / "slurm.yaml")
    logs, lines = work / "slurm-logs", []
    before = _running_jobs(set())
    unraisable, hook = [], sys.unraisablehook
    sys.unraisablehook = unraisable.append  # what the interpreter prints as "Exception ignored in ..."
    try:
        _submit_wait_and_watch_the_release(config, logs, lines, before)
        gc.collect()  # what the run left for the collector is collected now, not at the interpreter's exit
    finally:
        sys.unraisablehook = hook
    # the run's TLS files are deleted with their directory, not after it (a traceback each)
    assert not [u.exc_value for u in unraisable if isinstance(u.exc_value, OSError)], unraisable
    assert not list((work / "slurm-run").glob(".dask-credentials-*"))


def _submit_wait_and_watch_the_release(config, logs, lines, before) -> None:
    import time

    from distributed import Client

    from mace_ood.flows.ood import batch_queue_cluster
    from mace_ood.flows.server import run_api

    with run_api() as api_url, batch_queue_cluster(config, api_url, lines.append) as cluster, \
            Client(cluster, security=cluster.security) as client:
        futures = client.map(lambda x: (time.sleep(3), x)[1], range(4), pure=False)
        assert client.gather(futures, errors="raise") == list(range(4))
        del futures  # results held on a worker keep it: it cannot be retired with its keys
        submitted = job_ids(logs)
        assert 1 <= len(submitted) <= 2, submitted
        deadline = time.monotonic() + 120
        while (left := _running_jobs(set()) - before) and time.monotonic() < deadline:
            time.sleep(1)
        assert not left, f"jobs {sorted(left)} still held 120 s after the work ended"
        assert not cluster.workers  # the cluster is still open: the scale released them
