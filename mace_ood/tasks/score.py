"""Score tasks: fit a family's reference, score one evaluation (they read the latent files lazily)."""

from __future__ import annotations

import time

from prefect import task
from prefect.cache_policies import NO_CACHE

from mace_ood.config import ScoresConfig
from mace_ood.extract.devices import worker_device, worker_label
from mace_ood.records import EvaluationPlan, ScoreResult
from mace_ood.runtime import configure_process
from mace_ood.score.evaluation import fit_family_reference, score_evaluation
from mace_ood.tasks.console import hide_console_tracebacks


def _record(label: str, path: str, device: str, started: float) -> ScoreResult:
    return {"label": label, "path": path, "worker": worker_label(), "device": device,
            "wall_s": round(time.perf_counter() - started, 3)}


@task(name="fit-reference", task_run_name="fit reference of {evaluation.family}", cache_policy=NO_CACHE)
def fit_reference_task(
    evaluation: EvaluationPlan, output_dir: str, scores: ScoresConfig, device: str = "cpu",
    validation: EvaluationPlan | None = None, energy_key: str = "REF_energy",
) -> ScoreResult:
    """Alignment, covariance, GMM, k-NN sample and LLPR of a family's own training set, on a worker
    (LLPR calibrated on the family's ``validation`` evaluation when it has one)."""
    configure_process()
    hide_console_tracebacks()
    started = time.perf_counter()
    path = fit_family_reference(evaluation, output_dir, scores, validation, energy_key)
    return _record(evaluation.family, path, worker_device(device), started)


@task(name="score", task_run_name="score {evaluation.family} on {evaluation.dataset}", cache_policy=NO_CACHE)
def score_latents(
    evaluation: EvaluationPlan, output_dir: str, chunk_atoms: int, reference_file: str, device: str = "cpu"
) -> ScoreResult:
    """Every score, per atom and per structure, of one evaluation, on a worker (k-NN on its device)."""
    configure_process()
    hide_console_tracebacks()
    started = time.perf_counter()
    resolved = worker_device(device)
    path = score_evaluation(evaluation, output_dir, chunk_atoms, reference_file, device=resolved)
    return _record(evaluation.label, path, resolved, started)
