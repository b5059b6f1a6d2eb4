"""The OOD detection flow: plan -> extract (Dask) -> score -> report."""

from __future__ import annotations

import os
from contextlib import nullcontext

import dask
from prefect import flow, unmapped
from prefect.logging import get_run_logger
from prefect_dask import DaskTaskRunner

from mace_ood.config import DaskConfig, ExtractionSettings, RunConfig
from mace_ood.models import resolve_device
from mace_ood.pipeline import ExtractionJob, plan_run
from tasks.extract import extract_latents
from tasks.score import fit_reference_task, score_latents, write_report


def prefect_api_url() -> str | None:
    """The API this flow talks to; for the embedded server, the URL of its subprocess."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if url:
        return str(url)
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    return server.api_url


def worker_environment(n_workers: int, api_url: str | None) -> dict[str, str]:
    """Environment of local Dask workers: the flow's Prefect API, and CPU threads split evenly."""
    threads = max(1, (os.cpu_count() or 1) // n_workers)
    env = {
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads)),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DASK_LOGGING__DISTRIBUTED": os.environ.get("DASK_LOGGING__DISTRIBUTED", "warning"),
        "PYTHONWARNINGS": os.environ.get("PYTHONWARNINGS", "ignore::UserWarning:e3nn.o3._wigner"),
    }
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def make_task_runner(dask_config: DaskConfig, device: str, api_url: str | None) -> tuple[DaskTaskRunner, bool]:
    """A DaskTaskRunner for extraction, and whether tasks must be annotated with a GPU resource.

    Local cluster: one single-threaded worker process per GPU (each declaring ``GPU=1``),
    or ``n_workers`` CPU workers. Workers are processes because netCDF4/HDF5 is not thread-safe.
    """
    if dask_config.address:
        return DaskTaskRunner(address=dask_config.address), False
    import torch

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
    }
    if n_gpus:
        cluster_kwargs["resources"] = {"GPU": 1}
    return DaskTaskRunner(cluster_kwargs=cluster_kwargs), bool(n_gpus)


@flow(name="extract-latents", flow_run_name="extract {n_jobs} jobs")
def extract_all(jobs: list[ExtractionJob], settings: ExtractionSettings, gpu: bool, n_jobs: int) -> list[dict]:
    """Map extraction over the Dask workers; every job runs even when another fails."""
    with dask.annotate(resources={"GPU": 1}) if gpu else nullcontext():
        futures = extract_latents.map(jobs, settings=unmapped(settings))
    futures.wait()
    results, failures = [], []
    for job, future in zip(jobs, futures, strict=True):
        state = future.state
        if state.is_completed():
            results.append(future.result())
        else:
            exc = state.result(raise_on_failure=False)
            failures.append(f"{job.name}: {exc}")
    if failures:
        raise RuntimeError(
            f"{len(failures)} of {len(jobs)} extraction(s) failed (finished files are kept): " + "; ".join(failures)
        )
    return results


@flow(name="mace-ood", flow_run_name="mace-ood {config.output_dir}")
def ood_detection(config: RunConfig) -> dict:
    """Score every evaluation of ``config`` and write the reports; returns paths and top rows."""
    logger = get_run_logger()
    plan = plan_run(config)
    logger.info(
        "%d extraction job(s) over %d evaluation(s); datasets: %s",
        len(plan.jobs), len(plan.evaluations),
        ", ".join(f"{name} ({len(files)} files)" for name, files in plan.files.items()),
    )
    runner, gpu = make_task_runner(config.dask, config.device, prefect_api_url())
    extractions = extract_all.with_options(task_runner=runner)(
        plan.jobs, config.extraction_settings(), gpu, len(plan.jobs)
    )
    skipped = [
        {"family": r["family"], "seed": r["seed"], "dataset": r["dataset"], **s}
        for r in extractions
        for s in r["skipped"]
    ]
    references = {
        e.family: fit_reference_task(e, str(config.output_dir), config.scores)
        for e in plan.evaluations
        if e.reference
    }
    score_files = [
        score_latents(e, str(config.output_dir), config.chunk_atoms, references[e.family]) for e in plan.evaluations
    ]
    result = write_report(config, plan.evaluations, score_files, skipped)
    result["extractions"] = [
        {k: r[k] for k in ("family", "seed", "dataset", "n_structures", "n_atoms", "wall_s", "atoms_per_s", "reused")}
        for r in extractions
    ]
    logger.info(
        "report: %s; scores of every structure: %s",
        result["paths"]["report_xlsx"], result["paths"]["scores_csv"],
    )
    return result
