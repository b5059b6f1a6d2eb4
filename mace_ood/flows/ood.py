"""The OOD detection flow: plan -> extract -> fit reference -> score -> calibrate + select (Dask) -> report."""


import importlib.util
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from typing import NamedTuple

import dask
from prefect import flow, unmapped
from prefect.logging import get_run_logger
from prefect_dask import DaskTaskRunner

from mace_ood.cluster import (
    ClusterError,
    can_fork_workers,
    check_cluster,
    client_security,
    forked_local_workers,
    import_jobqueue,
    job_log_directory,
    jobqueue_cluster,
    plain_address_warning,
    probe_workers,
    worker_environment,
)
from mace_ood.config import DaskConfig, RunConfig
from mace_ood.extract.devices import PINNED_ENV
from mace_ood.extract.models import resolve_device
from mace_ood.flows.server import is_temporary, refuse_unauthenticated_api
from mace_ood.flows.session import call_in_session, raise_if_interrupted, record_flow_run
from mace_ood.jobwatch import JobWatch, unreachable_api_message
from mace_ood.plan import RunPlan, mark_complete, plan_run, write_manifest
from mace_ood.records import (
    EvaluationPlan,
    ExtractionJob,
    ExtractionResult,
    ReportResult,
    ScoreResult,
    SelectionResult,
    validation_evaluations,
)
from mace_ood.runtime import configure_process, quiet_resource_tracker
from mace_ood.tasks.console import hide_console_tracebacks
from mace_ood.tasks.extract import extract_latents
from mace_ood.tasks.report import write_report
from mace_ood.tasks.score import fit_reference_task, score_latents
from mace_ood.tasks.select import select_task


def prefect_api_url() -> tuple[str | None, bool]:
    """The API this flow talks to, and whether it is a temporary server, which lives only as
    long as this run (a session starts one with a secret, a longer start-up timeout and a retry;
    a flow called without one talks to the server Prefect started for it)."""
    from prefect.context import FlowRunContext
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if url:
        return str(url), is_temporary(str(url))
    context = FlowRunContext.get()
    url = str(context.client.api_url).rstrip("/") if context else None
    return url, is_temporary(url)


class TaskRunnerPlan(NamedTuple):
    runner: DaskTaskRunner
    gpu: bool  # whether tasks must be annotated with a GPU resource
    forked: bool  # local CPU workers fork from a process that imported torch and mace once


def make_task_runner(dask_config: DaskConfig, device: str, api_url: str | None) -> TaskRunnerPlan:
    """A DaskTaskRunner for extraction, whether tasks need a GPU resource, and whether local workers
    fork from a preloaded process (:func:`mace_ood.cluster.forked_local_workers`, entered by the flow
    around the runner's life).

    Local cluster: one single-threaded worker process per GPU (each declaring ``GPU=1``),
    or ``n_workers`` CPU workers. Workers are processes because netCDF4/HDF5 is not thread-safe.
    """
    import torch

    if dask_config.address:
        runner = DaskTaskRunner(address=dask_config.address, client_kwargs={"security": client_security(dask_config)})
        return TaskRunnerPlan(runner, resolve_device(device).startswith("cuda"), False)
    if dask_config.cluster != "local":
        raise ValueError("a batch-queue cluster is the run's own (batch_queue_cluster): give its address")

    quiet_resource_tracker()  # before the local workers that share it start
    n_gpus = torch.cuda.device_count() if resolve_device(device).startswith("cuda") else 0
    # CPU: single-threaded-ish workers scale better than torch threads on small graphs
    # (benchmarks/full_run.py workers: 2 workers 1.25x faster than 1 on 2 cores)
    n_workers = dask_config.n_workers or (n_gpus if n_gpus else max(1, min(4, os.cpu_count() or 1)))
    cluster_kwargs = {
        "n_workers": n_workers,
        "threads_per_worker": 1,
        "processes": True,
        "dashboard_address": "127.0.0.1:0",  # loopback only, a free port
        "host": "127.0.0.1",
        "env": worker_environment(n_workers, api_url),
        # they ignore a terminal's Ctrl-C (the run's owner stops them); the user's Dask preloads too
        "preload": ["mace_ood.worker_signals", *dask.config.get("distributed.worker.preload", [])],
    }
    if dask_config.security:
        from distributed.security import Security

        # other accounts of a shared login node reach 127.0.0.1 too; TLS costs ~0.2 s of worker
        # start-up (benchmarks/worker_start.py)
        cluster_kwargs.update(security=Security.temporary(), protocol="tls://")
    if n_gpus:
        cluster_kwargs["resources"] = {"GPU": 1}
        if n_gpus > 1 and importlib.util.find_spec("dask_cuda") is not None:
            # dask-cuda pins one GPU per worker (CUDA_VISIBLE_DEVICES) and knows GPU topology
            cluster_kwargs.pop("processes")  # LocalCUDACluster always runs worker processes
            # it rotates CUDA_VISIBLE_DEVICES: each worker's own GPU is its first visible one
            cluster_kwargs["env"] = {**cluster_kwargs["env"], PINNED_ENV: "1"}
            return TaskRunnerPlan(
                DaskTaskRunner(cluster_class="dask_cuda.LocalCUDACluster", cluster_kwargs=cluster_kwargs), True, False
            )
    forked = can_fork_workers(cluster_kwargs["env"], bool(n_gpus))
    if forked:  # a forked worker has the server's environment: give it this process's, as spawning does
        cluster_kwargs["env"] = {**os.environ, **cluster_kwargs["env"]}
    return TaskRunnerPlan(DaskTaskRunner(cluster_kwargs=cluster_kwargs), bool(n_gpus), forked)


_job_watch: ContextVar[JobWatch | None] = ContextVar("mace_ood_job_watch", default=None)


@contextmanager
def batch_queue_cluster(config: RunConfig, api_url: str | None, report) -> Iterator:
    """The run's SLURM/PBS cluster (dask-jobqueue), scaled adaptively between ``min_jobs`` and
    ``max_jobs`` and closed (its jobs cancelled) at the end; yields it. Its
    :class:`~mace_ood.jobwatch.JobWatch` is checked at each of the flow's waits (:func:`_gather`)."""
    queue = config.dask.jobqueue
    if refusal := unreachable_api_message(config.dask.cluster, queue.queue, api_url):
        raise ClusterError(refusal)
    with jobqueue_cluster(config.dask, api_url, config.output_dir) as cluster:
        cluster.adapt(minimum_jobs=queue.min_jobs, maximum_jobs=queue.max_jobs)

        def probe() -> None:  # the checks an existing cluster gets, once the first job's worker is up
            from distributed import Client

            with Client(cluster.scheduler_address, security=cluster.security, timeout=60) as client:
                probe_workers(client, config.output_dir, api_url)

        watch = JobWatch(cluster, config.dask.cluster, job_log_directory(config.dask, config.output_dir),
                         queue.worker_start_timeout, report, probe=probe)
        token = _job_watch.set(watch)
        try:
            yield cluster
        finally:
            _job_watch.reset(token)


def _check_jobs() -> None:
    watch = _job_watch.get()
    if watch is not None:
        watch.check()


class TaskFailures(RuntimeError):
    """Some tasks of a phase failed (one line naming each, with its cause); finished files stay."""


def _gather(futures: list, names: list[str], what: str, report: Callable[[str], None] | None = None) -> list:
    """Results of every future; one error naming each failure (finished files are kept). Waits in
    short steps: an interrupted library call stops the flow here (:func:`raise_if_interrupted`), and a
    batch-queue cluster's jobs are checked (:func:`_check_jobs`); ``report`` gets a line as each
    future finishes. The steps sleep and read the Dask futures' status: a ``wait(timeout=...)`` goes
    through distributed's ``sync`` with a callback timeout, which raised ``UnboundLocalError`` once
    in a SLURM run under load."""
    pending = dict(enumerate(futures))
    while pending:
        for index in [i for i, future in pending.items() if future.wrapped_future.done()]:
            del pending[index]
            if report:
                report(f"{names[index]}: finished ({len(futures) - len(pending)} of {len(futures)} {what})")
        if pending:
            raise_if_interrupted()
            _check_jobs()
            time.sleep(0.25)
    for future in futures:
        future.wait()
    results, failures = [], []
    for name, future in zip(names, futures, strict=True):
        state = future.state
        if state.is_completed():
            results.append(future.result())
        else:
            failures.append(f"{name}: {state.result(raise_on_failure=False)}")
    if failures:
        raise TaskFailures(
            f"{len(failures)} of {len(names)} {what} failed (finished files are kept): " + "; ".join(failures)
        )
    return results


@flow(name="extract-and-score", flow_run_name="extract {n_jobs} jobs, score and select {n_evaluations} evaluations")
def extract_and_score(
    jobs: list[ExtractionJob], evaluations: list[EvaluationPlan], config: RunConfig, gpu: bool, n_jobs: int,
    n_evaluations: int,
) -> tuple[list[ExtractionResult], list[ScoreResult], list[SelectionResult]]:
    """On the Dask workers: every extraction (each runs even when another fails), then each
    family's reference fit, then every evaluation's scores, then every evaluation's calibration
    and selection, each phase in parallel."""
    record_flow_run()
    output_dir, scores = str(config.output_dir), config.scores
    # the workers' task logs reach this console only from a local cluster (they share its stderr)
    report = get_run_logger().info if config.dask.address or config.dask.cluster != "local" else None
    with dask.annotate(resources={"GPU": 1}) if gpu else nullcontext():
        extractions = _gather(
            extract_latents.map(jobs, settings=unmapped(config.extraction_settings())), [j.name for j in jobs],
            "extraction(s)", report,
        )
        own = [e for e in evaluations if e.reference]
        labelled = validation_evaluations(evaluations)
        references = _gather(
            [fit_reference_task.submit(e, output_dir, scores, config.device, labelled.get(e.family),
                                       config.energy_key) for e in own],
            [e.family for e in own], "reference fit(s)", report,
        )
        reference_of = {e.family: r["path"] for e, r in zip(own, references, strict=True)}
        scored = _gather(
            [score_latents.submit(e, output_dir, config.chunk_atoms, reference_of[e.family], config.device)
             for e in evaluations],
            [e.label for e in evaluations], "scoring(s)", report,
        )
        own_of = {e.family: e for e in own}
        selections = _gather(
            [select_task.submit(e, own_of[e.family], output_dir, config.select, scores, labelled.get(e.family),
                                config.forces_key) for e in evaluations],
            [e.label for e in evaluations], "selection(s)", report,
        )
    return extractions, scored, selections


@flow(name="mace-ood", flow_run_name="mace-ood {config.output_dir}")
def ood_detection(config: RunConfig, plan: RunPlan | None = None) -> ReportResult:
    """Score every evaluation of ``config`` and write the reports; returns paths and top rows.

    ``plan``: :func:`mace_ood.plan.plan_run` of ``config``, where the caller made it (the CLI and
    ``mace_ood.run`` check the input with it before any server or worker starts); a deployment's run
    makes it here.

    Entered through the run's session (:mod:`mace_ood.flows.session`): the CLI's, ``mace_ood.run``'s,
    or, where none is active, one of its own (a deployment run's process owns its signals: Prefect
    cancelling it sends SIGTERM, which stops the run and its local Dask workers at once). Running
    again resumes from the files on disk."""
    configure_process()
    hide_console_tracebacks()
    import_jobqueue(config.dask)  # here, on the caller's thread; the flow's own runs on another
    return call_in_session(f"mace-ood on {config.output_dir}", _score_and_report, config, plan)


def _score_and_report(config: RunConfig, plan: RunPlan | None) -> ReportResult:
    logger = get_run_logger()
    plan = plan or plan_run(config)
    write_manifest(config, plan)
    logger.info(
        "%d extraction job(s) over %d evaluation(s); datasets: %s",
        len(plan.jobs), len(plan.evaluations),
        ", ".join(f"{name} ({len(files)} files)" for name, files in plan.files.items()),
    )
    api_url, temporary_server = prefect_api_url()
    refuse_unauthenticated_api(api_url)
    if warning := plain_address_warning(config.dask):
        logger.warning(warning)
    batch_queue = config.dask.cluster != "local"
    with batch_queue_cluster(config, api_url, logger.info) if batch_queue else nullcontext() as queue_cluster:
        if batch_queue:
            runner = DaskTaskRunner(address=queue_cluster.scheduler_address,
                                    client_kwargs={"security": queue_cluster.security})
            gpu, forked = config.dask.jobqueue.gpus_per_job > 0, False
            logger.info("%s cluster at %s (%s): up to %d job(s); their logs: %s", config.dask.cluster.upper(),
                        queue_cluster.scheduler_address,
                        "TLS, credentials of this run" if config.dask.security else "plain TCP: dask.security is off",
                        config.dask.jobqueue.max_jobs, _job_watch.get().log_directory)
        else:
            runner, gpu, forked = make_task_runner(config.dask, config.device, api_url)
        if config.dask.address:
            found = check_cluster(config.dask.address, config.output_dir, api_url, need_gpu=gpu,
                                  temporary_server=temporary_server, security=client_security(config.dask))
            logger.info("Dask cluster at %s: %d workers (%d with a GPU)", config.dask.address, found["workers"],
                        found["gpu_workers"])
        with forked_local_workers(runner.cluster_kwargs["env"]) if forked else nullcontext():
            extractions, scored, selections = extract_and_score.with_options(task_runner=runner)(
                plan.jobs, plan.evaluations, config, gpu, len(plan.jobs), len(plan.evaluations)
            )
    raise_if_interrupted()
    skipped = [
        {"family": r["family"], "seed": r["seed"], "dataset": r["dataset"], **s}
        for r in extractions
        for s in r["skipped"]
    ]
    stages = {
        "extractions": [
            {k: r[k] for k in ("family", "seed", "dataset", "n_structures", "n_atoms", "computed_structures",
                               "copied_structures", "resumed_structures", "wall_s", "atoms_per_s", "reused", "worker")}
            for r in extractions
        ],
        "scoring": [{k: r[k] for k in ("label", "worker", "device", "wall_s")} for r in scored],
        "selection": [{k: r[k] for k in ("label", "worker", "wall_s")} for r in selections],
    }
    result = write_report(config, plan.evaluations, selections, skipped, stages)
    mark_complete(plan)
    logger.info(
        "report: %s; scores of every structure: %s",
        result["paths"]["report_xlsx"], result["paths"]["scores_csv"],
    )
    return result


@flow(name="mace-ood-rescore", flow_run_name="rescore {config_path}")
def rescore_from_file(config_path: str, refresh: bool = False) -> ReportResult:
    """Score again from a config file (for schedules): latents already on disk for the same
    models, settings and structure contents are reused, so only new structures or new seeds
    are extracted; scores, selection and reports are recomputed from the store."""
    from mace_ood.config import load_config

    config = load_config(config_path)
    if refresh:
        config = config.model_copy(update={"refresh": True})
    return call_in_session(f"mace-ood on {config.output_dir}", ood_detection, config)
