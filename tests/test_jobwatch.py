"""The watch over a batch-queue cluster's jobs until its first worker arrives, against a stand-in
``squeue`` (the real scheduler's cases are in tests/test_slurm.py)."""

from __future__ import annotations

import os
import stat
from types import SimpleNamespace

import pytest

from mace_ood.cluster import ClusterError
from mace_ood.jobwatch import JobWatch


def fake_squeue(tmp_path, monkeypatch, output: str, stderr: str = "", code: int = 0) -> None:
    script = tmp_path / "bin" / "squeue"
    script.parent.mkdir()
    script.write_text(f"#!/bin/sh\nprintf '{output}'\nprintf '{stderr}' >&2\nexit {code}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ['PATH']}")


def cluster(job_ids=("41",), workers=None):
    return SimpleNamespace(workers={f"job{j}": SimpleNamespace(job_id=j) for j in job_ids},
                           scheduler_info={"workers": workers or {}})


def test_a_job_that_ended_before_its_worker_names_its_state_and_its_last_error_line(tmp_path, monkeypatch):
    fake_squeue(tmp_path, monkeypatch, "41|FAILED|NonZeroExitCode\\n")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "dask-worker-41.err").write_text("starting\nmodule: cuda/12.4: not found\n\n")
    with pytest.raises(ClusterError) as failed:
        JobWatch(cluster(), "slurm", str(tmp_path / "logs"), timeout_s=3600).check()
    assert str(failed.value).startswith("SLURM job 41 ended (FAILED) before its Dask worker started: "
                                        "module: cuda/12.4: not found (")


def test_a_job_squeue_has_forgotten_counts_as_ended(tmp_path, monkeypatch):
    fake_squeue(tmp_path, monkeypatch, "", "slurm_load_jobs error: Invalid job id specified", 1)
    with pytest.raises(ClusterError, match="ended \\(gone from squeue\\).*no .err log of job 41"):
        JobWatch(cluster(), "slurm", str(tmp_path), timeout_s=3600).check()


def test_a_queue_that_starts_no_worker_stops_the_run_after_the_timeout_with_squeue_s_reason(tmp_path, monkeypatch):
    fake_squeue(tmp_path, monkeypatch, "41|PENDING|Resources\\n")
    reports: list[str] = []
    watch = JobWatch(cluster(), "slurm", str(tmp_path), timeout_s=3600, report=reports.append, poll_s=0)
    watch.check()  # pending, inside the timeout: reported, not raised
    assert reports == ["waiting for the first Dask worker, 0 s: SLURM job(s) 41 PENDING (Resources)"]
    watch.timeout_s = 0
    with pytest.raises(ClusterError, match=r"no Dask worker started within 0 s .*41 PENDING \(Resources\)"):
        watch.check()


def test_no_conclusion_without_squeue_s_answer_or_once_a_worker_arrived(tmp_path, monkeypatch):
    fake_squeue(tmp_path, monkeypatch, "", "slurm_load_jobs error: Unable to contact slurm controller", 1)
    JobWatch(cluster(), "slurm", str(tmp_path), timeout_s=3600).check()  # the controller down: nothing concluded
    (tmp_path / "b").mkdir()
    fake_squeue(tmp_path / "b", monkeypatch, "41|FAILED|NonZeroExitCode\\n")
    arrived = JobWatch(cluster(workers={"tls://node:1": {}}), "slurm", str(tmp_path), timeout_s=0)
    arrived.check()  # a worker is up: the watch is done, whatever the jobs
    assert arrived.arrived


def fake_sinfo(tmp_path, monkeypatch, nodes: str) -> None:
    script = tmp_path / "sbin" / "sinfo"
    script.parent.mkdir()
    script.write_text(f"#!/bin/sh\nprintf '{nodes}'\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ['PATH']}")


def test_a_loopback_prefect_api_is_refused_when_the_partition_s_nodes_are_other_machines(tmp_path, monkeypatch):
    import socket

    from mace_ood.jobwatch import unreachable_api_message

    fake_sinfo(tmp_path, monkeypatch, "node01\\nnode02\\n")
    message = unreachable_api_message("slurm", "gpu", "http://127.0.0.1:4200/api")
    assert message.startswith("the flow's Prefect API http://127.0.0.1:4200/api is on this machine's loopback, "
                              "which the SLURM nodes (node01, node02) cannot reach")
    assert unreachable_api_message("slurm", "gpu", "http://login1:4200/api") is None  # reachable: not for us to judge
    assert unreachable_api_message("pbs", "gpu", "http://127.0.0.1:4200/api") is None
    (tmp_path / "b").mkdir()
    fake_sinfo(tmp_path / "b", monkeypatch, f"{socket.gethostname()}\\n")  # one node, this one: loopback reaches it
    assert unreachable_api_message("slurm", "debug", "http://127.0.0.1:4200/api") is None


def test_the_first_workers_are_probed_once_and_a_failed_probe_stops_the_run(tmp_path, monkeypatch):
    """A batch-queue job's workers get the checks an existing cluster's get, once they arrive."""
    fake_squeue(tmp_path, monkeypatch, "41|RUNNING|None\\n")
    calls: list[int] = []

    def probe() -> None:
        calls.append(1)
        raise ClusterError("worker tls://node1:4000: cannot import mace_ood; install mace-ood in the workers' environment")

    waiting = cluster()
    watch = JobWatch(waiting, "slurm", str(tmp_path), timeout_s=3600, poll_s=0, probe=probe)
    watch.check()  # no worker yet: no probe
    assert calls == []
    waiting.scheduler_info["workers"] = {"tls://node1:4000": {}}
    with pytest.raises(ClusterError, match="cannot import mace_ood"):
        watch.check()
    watch.check()  # checked once: later waits do not probe again
    assert calls == [1]


def test_probe_workers_names_a_worker_on_another_prefect_api(tmp_path, monkeypatch):
    """The real probe on a real (in-process) cluster: a worker whose PREFECT_API_URL is not the flow's is named."""
    from distributed import Client, LocalCluster

    from mace_ood.cluster import probe_workers

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as local, \
            Client(local) as client:
        probe_workers(client, tmp_path / "out", "http://127.0.0.1:4200/api")  # passes
        assert not list((tmp_path / "out").iterdir())  # the probe's file is removed
        with pytest.raises(ClusterError, match=r"PREFECT_API_URL is 'http://127.0.0.1:4200/api', the flow uses"):
            probe_workers(client, tmp_path / "out", "http://127.0.0.1:9999/api")
