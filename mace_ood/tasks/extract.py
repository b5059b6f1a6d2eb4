"""Extraction task: one (family, seed, dataset) -> one latent netCDF file."""

from __future__ import annotations

import time

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from prefect.runtime import task_run

from mace_ood.config import ExtractionSettings
from mace_ood.extract.devices import worker_device, worker_label
from mace_ood.extract.models import cached_model
from mace_ood.extract.oom import free_device_memory, is_out_of_memory
from mace_ood.extract.stream import extract_to_netcdf
from mace_ood.records import ExtractionJob, ExtractionResult
from mace_ood.runtime import configure_process
from mace_ood.tasks.artifacts import artifact_key
from mace_ood.tasks.console import hide_console_tracebacks


def retry_on_out_of_memory(task, task_run, state) -> bool:
    """Retry only an out-of-memory error that escaped the in-process back-off (e.g. while a big
    batch was collated); a structure that does not fit even in domains is deterministic and fails."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, BaseException) and is_out_of_memory(exc)


def batch_size_for_attempt(batch_size: int | None, attempt: int) -> int | None:
    """Halve the batch on every retry, down to 1 (None: no count cap, the atom budget is halved)."""
    return None if batch_size is None else max(1, batch_size >> max(0, attempt - 1))


def settings_for_attempt(settings: ExtractionSettings, attempt: int) -> ExtractionSettings:
    """On a retry, the batch's structure count and its atom budget both halved per attempt:
    what the in-process back-off cannot do, since it only splits a batch already collated."""
    if attempt <= 1:
        return settings
    atoms = max(1, settings.max_atoms_per_batch >> (attempt - 1))
    return settings.model_copy(update={"max_atoms_per_batch": atoms})


@task(
    name="extract-latents",
    task_run_name="extract {job.family} seed-{job.seed} on {job.dataset}",
    retries=4,
    retry_condition_fn=retry_on_out_of_memory,
    cache_policy=NO_CACHE,
)
def extract_latents(job: ExtractionJob, settings: ExtractionSettings) -> ExtractionResult:
    """Stream one model's latents over one dataset to ``job.out_path``; returns a small summary."""
    configure_process()
    hide_console_tracebacks()
    logger = get_run_logger()
    attempt = task_run.run_count or 1
    batch_size = batch_size_for_attempt(settings.batch_size, attempt)
    settings = settings_for_attempt(settings, attempt)
    device = worker_device(settings.device)
    if attempt > 1:
        free_device_memory()
        cached_model.cache_clear()  # a fresh copy of the model on a device released of the last attempt
        logger.warning("retry %d after out-of-memory: batch size %s, at most %d atoms per batch",
                       attempt - 1, batch_size or "unset", settings.max_atoms_per_batch)
    last_log = [time.monotonic()]
    artifact = create_progress_artifact(
        0.0, key=artifact_key("extract", job.family, f"seed{job.seed}", job.dataset),
        description=f"Latents of {job.family} seed {job.seed} on {job.dataset} ({job.n_structures} structures)",
    )

    def progress(n_structures: int, n_atoms: int) -> None:
        if time.monotonic() - last_log[0] > 5:
            last_log[0] = time.monotonic()
            logger.info("%s: %d structures, %d atoms done", job.name, n_structures, n_atoms)
            if job.n_structures:
                update_progress_artifact(artifact, min(99.0, 100.0 * n_structures / job.n_structures))

    summary = extract_to_netcdf(
        job.model_path, list(job.files), job.out_path,
        settings.model_copy(update={"device": device}), batch_size=batch_size, progress=progress,
        expected_sha256=job.model_sha256, head=job.head, llpr_forces=job.llpr_forces,
    )
    update_progress_artifact(artifact, 100.0)
    if summary.reused:
        logger.info("%s: reusing %s (same model, inputs and settings)", job.name, job.out_path)
    else:
        logger.info(
            "%s: %d structures (%d computed, %d copied from earlier latents, %d resumed), %d atoms in %.1f s "
            "(%.0f atoms/s, %d forward passes, smallest batch %d, %d split into domains, %d skipped)",
            job.name, summary.n_structures, summary.computed_structures, summary.copied_structures,
            summary.resumed_structures, summary.n_atoms, summary.wall_s, summary.atoms_per_s,
            summary.forward_passes, summary.smallest_batch, summary.split_structures, len(summary.skipped),
        )
    return {**summary.as_dict(), "family": job.family, "seed": job.seed, "dataset": job.dataset, "worker": worker_label()}
