"""Dask clusters beyond one machine: batch-queue (SLURM/PBS) clusters and checks of an
existing cluster before any work is sent to it. No Prefect here."""

from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from mace_ood.config import DaskConfig, TLSFiles
from mace_ood.runtime import ENVIRONMENT_DEFAULTS, environment


class ClusterError(RuntimeError):
    """A cluster that cannot run this flow; the message says what to fix."""


def jobqueue_kwargs(dask_config: DaskConfig, api_url: str | None, output_dir: str | Path | None = None) -> dict[str, Any]:
    """Keyword arguments of a dask-jobqueue cluster (SLURMCluster / PBSCluster) from the config; the
    jobs' logs go to ``jobqueue.log_directory``, else ``<output_dir>/jobs``."""
    queue = dask_config.jobqueue
    if queue is None:
        raise ClusterError(f"dask.cluster: {dask_config.cluster} needs a `dask.jobqueue` section")
    prologue = list(queue.job_script_prologue)
    env = worker_environment(queue.processes, api_url, queue.cores, inherit=False)
    prologue += [f"export {k}={v}" for k, v in env.items()]
    extra = list(queue.job_extra_directives)
    worker_args: list[str] = []
    if queue.gpus_per_job:
        if dask_config.cluster == "slurm":
            extra.append(f"--gres=gpu:{queue.gpus_per_job}")
        worker_args += ["--resources", f"GPU={max(1, queue.gpus_per_job // queue.processes)}"]
    # Dask sees one core per worker process (one task at a time: HDF5 is not thread-safe);
    # the batch system books all of them for the model's threads.
    kwargs: dict[str, Any] = {
        "queue": queue.queue,
        "account": queue.account,
        "walltime": queue.walltime,
        "cores": queue.processes,
        "processes": queue.processes,
        "memory": queue.memory,
        "job_script_prologue": prologue,
        "job_extra_directives": extra,
        "worker_extra_args": worker_args,
        "scheduler_options": {"dashboard_address": "127.0.0.1:0"},
    }
    if dask_config.cluster == "slurm":
        kwargs["job_cpu"] = queue.cores
    else:
        gpus = f":ngpus={queue.gpus_per_job}" if queue.gpus_per_job else ""
        kwargs["resource_spec"] = f"select=1:ncpus={queue.cores}:mem={queue.memory}{gpus}"
    if queue.interface:
        kwargs["interface"] = queue.interface
    if queue.log_directory or output_dir:
        kwargs["log_directory"] = job_log_directory(dask_config, output_dir)
    return {k: v for k, v in kwargs.items() if v is not None}


def job_log_directory(dask_config: DaskConfig, output_dir: str | Path) -> str:
    return dask_config.jobqueue.log_directory or str(Path(output_dir) / "jobs")


def import_jobqueue(dask_config: DaskConfig) -> None:
    """Import dask-jobqueue now, on the main thread, for a batch-queue cluster: its import sets
    SIGINT to ``sys.exit`` (``dask_jobqueue/runner.py``), which fails on any other thread (where the
    flow runs) and would replace the caller's own handler; the caller's is put back."""
    import signal

    if dask_config.cluster == "local" or "dask_jobqueue" in sys.modules:
        return
    if threading.current_thread() is not threading.main_thread():
        raise ClusterError(f"dask.cluster: {dask_config.cluster} needs dask_jobqueue imported on the main "
                           "thread first (`import dask_jobqueue`), or the run started from it")
    previous = signal.getsignal(signal.SIGINT)
    try:
        import dask_jobqueue  # noqa: F401
    finally:
        signal.signal(signal.SIGINT, previous)


def jobqueue_cluster_class(dask_config: DaskConfig) -> str:
    return {"slurm": "dask_jobqueue.SLURMCluster", "pbs": "dask_jobqueue.PBSCluster"}[dask_config.cluster]


@contextmanager
def jobqueue_cluster(dask_config: DaskConfig, api_url: str | None, output_dir: str | Path,
                     credentials_parent: str | Path | None = None, **overrides: Any):
    """The dask-jobqueue cluster of the config (no job submitted yet), closed at the end.

    With ``dask.security`` (the default) the scheduler and workers talk TLS with credentials made
    for this cluster (``Security.temporary``): anyone else who reaches the scheduler's port is
    refused. The workers' copies are written to a directory only this user can open (mode 0700,
    files 0600), in ``credentials_parent`` (default ``output_dir``: the shared file system the jobs
    see), and removed with the cluster."""
    import importlib
    import tempfile
    from contextlib import ExitStack

    import_jobqueue(dask_config)
    module, name = jobqueue_cluster_class(dask_config).rsplit(".", 1)
    kwargs = jobqueue_kwargs(dask_config, api_url, output_dir)
    with ExitStack() as stack:
        if dask_config.security:
            from distributed.security import Security

            parent = Path(credentials_parent or output_dir)
            parent.mkdir(parents=True, exist_ok=True)
            credentials = stack.enter_context(tempfile.TemporaryDirectory(  # mode 0700
                prefix=".dask-credentials-", dir=parent, ignore_cleanup_errors=True))
            kwargs.update(security=Security.temporary(), shared_temp_directory=credentials)
        clusters: list = []
        stack.callback(lambda: [_close_credential_files(c) for c in clusters])  # after the cluster, before the directory
        clusters.append(stack.enter_context(getattr(importlib.import_module(module), name)(**{**kwargs, **overrides})))
        yield clusters[0]


def _close_credential_files(cluster) -> None:
    """Close (and so delete) the TLS files dask-jobqueue wrote for the cluster's jobs while their
    directory is still there: the cluster holds them as ``NamedTemporaryFile`` attributes
    (``_job_<key>``, dask-jobqueue 0.9's ``_get_worker_security``), deleted only when it is
    collected, which was after the directory had gone, each printing a ``FileNotFoundError``
    traceback (3 on a SLURM run; tests/test_slurm.py)."""
    for attribute, value in list(vars(cluster).items()):
        if attribute.startswith("_job_") and hasattr(value, "close"):
            with suppress(OSError):
                value.close()


def worker_environment(
    n_workers: int, api_url: str | None, cores: int | None = None, inherit: bool = True
) -> dict[str, str]:
    """Environment of Dask workers: the flow's Prefect API, and the cores split evenly.

    ``inherit``: this machine's OMP settings win (local workers); off for remote jobs.
    """
    threads = max(1, (cores or os.cpu_count() or 1) // max(1, n_workers))
    env = {key: (os.environ if inherit or not key.startswith("OMP_") else {}).get(key, value)
           for key, value in ENVIRONMENT_DEFAULTS.items()}
    env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", str(threads)) if inherit else str(threads)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


# What a local worker imports before its first task, imported once by the process the workers fork
# from (multiprocessing's forkserver) instead of once by each worker: `import torch, e3nn,
# mace.modules` alone is 6-7 CPU-seconds on this project's 2-core machine.
WORKER_PRELOAD = ("distributed", "torch", "e3nn", "mace.modules", "mace_ood.extract.stream",
                  "mace_ood.score.evaluation", "mace_ood.select.stage")
# Prefect and what a worker imports to run one of the flow's tasks (1.5-2 CPU-seconds a worker).
# Prefect reads its settings (the flow's API URL among them) when it is imported: the forkserver is
# started with the workers' environment, and started again for a run whose Prefect settings differ.
PREFECT_PRELOAD = ("prefect", "prefect.main", "prefect.task_engine", "prefect_dask")
# last: the forked workers ignore SIGINT (mace_ood/worker_signals.py says why)
SIGNAL_PRELOAD = ("mace_ood.worker_signals",)
_forkserver_lock = threading.Lock()
_own_forkserver_pid: int | None = None
_forkserver_prefect: tuple[tuple[str, str], ...] | None = None  # the PREFECT_* variables it imported Prefect with
_forkserver_users = 0  # runs of this process whose workers fork from it now


def can_fork_workers(worker_env: dict[str, str], gpu: bool) -> bool:
    """Whether local workers may fork from a preloaded process: on Linux, CPU only (a process that
    forked after CUDA was touched cannot use it; GPU workers are spawned) and one thread per worker
    (``OMP_NUM_THREADS=1``: no OpenMP or BLAS thread pool exists in the process forked from, and
    none is needed in the workers)."""
    return sys.platform.startswith("linux") and not gpu and worker_env.get("OMP_NUM_THREADS") == "1"


def _prefect_variables(env: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in env.items() if k.startswith("PREFECT_")))


@contextmanager
def forked_local_workers(worker_env: dict[str, str]) -> Iterator[bool]:
    """Within: local Dask workers started by this process fork from one server process that has
    imported :data:`WORKER_PRELOAD` and :data:`PREFECT_PRELOAD`, started with ``worker_env`` (the
    workers' whole environment). Yields whether they do.

    A run whose Prefect settings (``PREFECT_*`` in ``worker_env``) differ from the server's starts
    it again, unless another run of this process forks from it now: that run's workers keep it, and
    this run's are spawned. A forkserver something else in this process started first (other
    preloads, other settings) leaves the workers spawned, each importing for itself."""
    global _own_forkserver_pid, _forkserver_prefect, _forkserver_users
    from multiprocessing import forkserver

    import dask

    prefect_env = _prefect_variables(worker_env)
    with _forkserver_lock:
        running = getattr(forkserver._forkserver, "_forkserver_pid", None)
        ours = running is None or running == _own_forkserver_pid
        if ours and running is not None and _forkserver_prefect != prefect_env:
            if _forkserver_users:
                ours = False
            else:
                _stop_forkserver()
        if ours:
            _start_forkserver(worker_env)
            _own_forkserver_pid = forkserver._forkserver._forkserver_pid
            _forkserver_prefect = prefect_env
            _forkserver_users += 1
    if not ours:
        method = dask.config.get("distributed.worker.multiprocessing-method")
        # inside another run's `forkserver` setting (Dask's config is global), fork from nothing
        with dask.config.set({"distributed.worker.multiprocessing-method": "spawn" if method == "forkserver" else method}):
            yield False
        return
    try:
        with dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"}):
            yield True
    finally:
        with _forkserver_lock:
            _forkserver_users -= 1


def _start_forkserver(worker_env: dict[str, str]) -> None:
    """Start (or keep) multiprocessing's forkserver with the preloads and ``worker_env`` as its
    environment."""
    import multiprocessing
    from multiprocessing import forkserver

    multiprocessing.get_context("forkserver").set_forkserver_preload([*WORKER_PRELOAD, *PREFECT_PRELOAD, *SIGNAL_PRELOAD])
    # the server inherits this process's environment as it is now: OpenMP and BLAS read their
    # thread settings once, when the server imports torch, and Prefect its settings
    stale = tuple(k for k in os.environ if k.startswith("PREFECT_") and k not in worker_env)
    with environment(worker_env, remove=stale):
        forkserver.ensure_running()  # a no-op while it runs; restarted if it died


def _stop_forkserver() -> None:
    """Stop the forkserver (no run of this process forks from it now)."""
    from multiprocessing import forkserver

    server = forkserver._forkserver
    try:
        server._stop()  # CPython's own way (its tests'): closing the server's "alive" pipe ends it
    except ChildProcessError:  # it had died and was reaped already
        server._forkserver_pid = None


def _probe(output_dir: str, token: str) -> dict[str, Any]:
    """Runs on each worker: can it import mace-ood, which Prefect API, can it write the output."""
    import importlib.util

    probe = Path(output_dir) / f".worker-probe-{token}-{os.getpid()}"
    try:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        probe.write_text(token)
        written = str(probe)
    except OSError as exc:
        written = f"error: {exc}"
    return {
        "mace_ood": importlib.util.find_spec("mace_ood") is not None,
        "prefect_api_url": os.environ.get("PREFECT_API_URL"),
        "written": written,
    }


def is_loopback_host(host: str | None) -> bool:
    """Whether ``host`` (a name or an address) is this machine's loopback: no other machine reaches it."""
    import ipaddress

    if host == "localhost":
        return True
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def client_security(dask_config: DaskConfig):
    """The flow's ``distributed.Security`` for an existing cluster given TLS files, else None."""
    if not isinstance(dask_config.security, TLSFiles):
        return None
    from distributed.security import Security

    files = dask_config.security
    return Security(tls_ca_file=files.ca_file, tls_client_cert=files.cert, tls_client_key=files.key,
                    require_encryption=True)


def plain_address_warning(dask_config: DaskConfig) -> str | None:
    """One line when ``dask.address`` is plain TCP to another machine, else None."""
    address = dask_config.address
    if not address or isinstance(dask_config.security, TLSFiles):
        return None
    scheme, _, location = address.rpartition("://")
    if scheme not in ("", "tcp") or is_loopback_host(location.rsplit(":", 1)[0]):
        return None
    return (f"dask.address {address} is plain TCP beyond this machine: anyone who reaches it can run code as you on "
            "its workers; start the scheduler and workers with --tls-ca-file/--tls-cert/--tls-key and give "
            "dask.security: {ca_file, cert, key}")


def no_server_message(temporary_url: str) -> str:
    """What to run when an existing cluster meets a flow that has no Prefect server of its own."""
    import socket

    host = socket.gethostname()
    return (
        f"this flow has no Prefect server (PREFECT_API_URL is not set), so it started a temporary one at "
        f"{temporary_url} that the cluster's workers cannot reach and that ends with the run. Start one server, "
        f"with a secret, and point the flow, the scheduler and every worker at it: (1) on {host}: "
        f"`PREFECT_SERVER_API_AUTH_STRING=<secret> prefect server start --host 0.0.0.0 --port 4200`; (2) in the "
        f"flow's shell and before `dask scheduler` and `dask worker` on every node: `export "
        f"PREFECT_API_URL=http://{host}:4200/api PREFECT_API_AUTH_STRING=<secret>`; (3) restart the workers and "
        f"run again"
    )


def probe_workers(client, output_dir: str | Path, api_url: str | None, temporary_server: bool = False) -> None:
    """Ask every worker of ``client``'s cluster whether it imports mace_ood, talks to the flow's
    Prefect API (``api_url``) and writes to ``output_dir`` where this process sees it; raises
    :class:`ClusterError` naming the first worker that does not. Run before work is sent to an
    existing cluster (:func:`check_cluster`) and when a batch-queue job's first worker arrives
    (:class:`mace_ood.jobwatch.JobWatch`)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    answers = client.run(_probe, str(output_dir), token)
    for worker, answer in answers.items():
        if not answer["mace_ood"]:
            raise ClusterError(f"worker {worker}: cannot import mace_ood; install mace-ood in the workers' environment")
        if api_url and answer["prefect_api_url"] != api_url and temporary_server:
            raise ClusterError(no_server_message(api_url))
        if api_url and answer["prefect_api_url"] != api_url:
            raise ClusterError(
                f"worker {worker}: PREFECT_API_URL is {answer['prefect_api_url']!r}, the flow uses {api_url!r}; "
                "start the workers with the same PREFECT_API_URL"
            )
        written = answer["written"]
        if written.startswith("error") or not Path(written).is_file():
            raise ClusterError(
                f"worker {worker}: cannot write to {output_dir} where this process sees it ({written}); "
                "output_dir must be on storage shared by the flow and every worker"
            )
        Path(written).unlink(missing_ok=True)


def check_cluster(
    address: str, output_dir: str | Path, api_url: str | None, need_gpu: bool, timeout: float = 30,
    temporary_server: bool = False, security=None,
) -> dict:
    """Check an existing Dask cluster before sending work; raises ClusterError saying what is wrong.

    Every worker must import mace_ood, talk to the same Prefect API as the flow and write to
    ``output_dir`` in a place the flow's machine sees (shared storage); with ``need_gpu``,
    some worker must declare a ``GPU`` resource (else the tasks would wait forever).
    ``temporary_server``: the flow's API is its own temporary server (no PREFECT_API_URL);
    workers that do not share it get the exact commands to set one up.
    """
    from distributed import Client

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if address.startswith("tls://") and security is None:
        raise ClusterError(f"dask.address {address} speaks TLS: give dask.security: {{ca_file, cert, key}}")
    try:
        client = Client(address, timeout=timeout, security=security)
    except OSError as exc:
        raise ClusterError(f"dask.address {address}: cannot connect ({exc})") from None
    try:
        deadline = time.monotonic() + timeout
        while not client.scheduler_info()["workers"] and time.monotonic() < deadline:
            time.sleep(0.5)
        workers = client.scheduler_info()["workers"]
        if not workers:
            raise ClusterError(f"dask.address {address}: the scheduler has no workers")
        probe_workers(client, output_dir, api_url, temporary_server)
        gpu_workers = [w for w, info in workers.items() if info.get("resources", {}).get("GPU", 0) >= 1]
        if need_gpu and not gpu_workers:
            raise ClusterError(
                f"dask.address {address}: no worker declares a GPU resource, so GPU tasks would wait forever; "
                "start workers with `--resources GPU=1` (one per GPU) or use device: cpu"
            )
        return {"workers": len(workers), "gpu_workers": len(gpu_workers)}
    finally:
        client.close()
