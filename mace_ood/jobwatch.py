"""Batch-queue jobs until their Dask workers arrive: a job that ends first, or a queue that never
starts one, stops the run in one line. No Prefect here."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from mace_ood.cluster import ClusterError

ACTIVE_JOB_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "RESIZING", "SUSPENDED", "REQUEUED"}


class JobWatch:
    """A batch-queue cluster's jobs until its first Dask worker arrives.

    :meth:`check` (called at each of the flow's waits) raises :class:`ClusterError`, in one line,
    when a SLURM job ends before any worker has started (a failing prologue or ``module load``, no
    Python with mace-ood on the node), quoting the last line of the job's ``.err`` log, or when no
    worker has started ``timeout_s`` after the first job was submitted (a full queue: the line
    gives squeue's reason). ``report`` gets a line every ``report_every_s`` while jobs wait. Only
    the start is watched: once workers have arrived, ``probe`` (when given) checks them once, as an
    existing cluster's workers are checked (:func:`mace_ood.cluster.probe_workers`: mace_ood
    importable, the flow's Prefect API, ``output_dir`` writable where the flow sees it); after that,
    a job that ends (walltime, ``scancel``) is replaced by the adaptive scaling and its unfinished
    work resumes from the disk."""

    def __init__(self, cluster, kind: str, log_directory: str | None, timeout_s: float,
                 report=None, poll_s: float = 2.0, report_every_s: float = 60.0, probe=None) -> None:
        self.cluster, self.kind, self.log_directory, self.probe = cluster, kind, log_directory, probe
        self.timeout_s, self.report, self.poll_s, self.report_every_s = timeout_s, report, poll_s, report_every_s
        self.jobs: set[str] = set()
        self.arrived = False
        self._first_job_at: float | None = None
        self._next_check = self._next_report = 0.0

    def check(self) -> None:
        now = time.monotonic()
        if self.arrived or now < self._next_check:
            return
        self._next_check = now + self.poll_s
        if self.cluster.scheduler_info.get("workers"):
            self.arrived = True
            if self.probe is not None:
                self.probe()
            return
        self.jobs |= {str(job.job_id) for job in list(self.cluster.workers.values()) if getattr(job, "job_id", None)}
        if not self.jobs:
            return  # nothing submitted yet: the adaptive scaling submits once tasks wait
        if self._first_job_at is None:
            self._first_job_at = self._next_report = now
        states = slurm_job_states(self.jobs) if self.kind == "slurm" else None
        for job_id in sorted(self.jobs, key=int):
            state, _ = (states or {}).get(job_id, ("", ""))
            if states is not None and state not in ACTIVE_JOB_STATES:
                raise ClusterError(
                    f"SLURM job {job_id} ended ({state or 'gone from squeue'}) before its Dask worker started: "
                    f"{last_error_line(self.log_directory, job_id)}"
                )
        waiting = ", ".join(f"{j} {' '.join((states or {}).get(j, ('submitted', ''))).strip()}"
                            for j in sorted(self.jobs, key=int))
        if now - self._first_job_at > self.timeout_s:
            raise ClusterError(
                f"no Dask worker started within {self.timeout_s:.0f} s of the first {self.kind.upper()} job "
                f"(jobs: {waiting}); raise dask.jobqueue.worker_start_timeout or ask for fewer resources"
            )
        if self.report and now >= self._next_report:
            self._next_report = now + self.report_every_s
            self.report(f"waiting for the first Dask worker, {now - self._first_job_at:.0f} s: {self.kind.upper()} "
                        f"job(s) {waiting}")


def slurm_job_states(job_ids: set[str]) -> dict[str, tuple[str, str]] | None:
    """``{job id: (state, reason)}`` from squeue, a job squeue no longer knows absent (it forgets
    them MinJobAge after they end); None when squeue itself did not answer (nothing can be concluded)."""
    try:
        done = subprocess.run(["squeue", "-h", "-t", "all", "-j", ",".join(sorted(job_ids)), "-o", "%i|%T|%r"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return {} if "Invalid job id" in done.stderr else None  # every id forgotten: all ended
    states = {}
    for line in done.stdout.splitlines():
        job_id, state, reason = (line.split("|") + ["", ""])[:3]
        states[job_id.strip()] = (state.strip(), "" if reason.strip() in ("None", "") else f"({reason.strip()})")
    return states


def last_error_line(log_directory: str | None, job_id: str) -> str:
    """The last non-empty line of the job's ``.err`` log, and where the log is."""
    logs = sorted(Path(log_directory).glob(f"*-{job_id}.err")) if log_directory else []
    if not logs:
        return f"no .err log of job {job_id} in {log_directory}"
    lines = [line.strip() for line in logs[0].read_text(errors="replace").splitlines() if line.strip()]
    return f"{lines[-1] if lines else 'its .err log is empty'} ({logs[0]})"


def unreachable_api_message(kind: str, queue: str | None, api_url: str | None) -> str | None:
    """One line when the flow's Prefect API is on loopback (a temporary server, or a server started
    on 127.0.0.1) and the SLURM partition's nodes are other machines, which cannot reach it."""
    import socket
    from urllib.parse import urlparse

    from mace_ood.cluster import is_loopback_host

    if kind != "slurm" or not api_url or not is_loopback_host(urlparse(api_url).hostname):
        return None
    command = ["sinfo", "-h", "-N", "-o", "%N", *(["-p", queue] if queue else [])]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    here = {socket.gethostname().split(".")[0], "localhost"}
    others = sorted({node for node in done.stdout.split() if node.split(".")[0] not in here})
    if done.returncode != 0 or not others:
        return None
    return (f"the flow's Prefect API {api_url} is on this machine's loopback, which the SLURM nodes "
            f"({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}) cannot reach: start a Prefect server they "
            "reach (PREFECT_SERVER_API_AUTH_STRING=<secret> prefect server start --host 0.0.0.0) and export "
            "PREFECT_API_URL=http://<this host>:4200/api PREFECT_API_AUTH_STRING=<secret> before the run")
