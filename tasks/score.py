"""Score tasks: fit a family's reference, score one evaluation (they read the latent files lazily)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from mace_ood.config import ScoresConfig
from mace_ood.records import EvaluationPlan
from mace_ood.runtime import configure_process
from mace_ood.score.evaluation import fit_family_reference, score_evaluation


@task(name="fit-reference", task_run_name="fit reference of {evaluation.family}", cache_policy=NO_CACHE)
def fit_reference_task(evaluation: EvaluationPlan, output_dir: str, scores: ScoresConfig) -> str:
    """Alignment, covariance, GMM and k-NN sample of a family's own training set; returns the file."""
    configure_process()
    return fit_family_reference(evaluation, output_dir, scores)


@task(name="score", task_run_name="score {evaluation.family} on {evaluation.dataset}", cache_policy=NO_CACHE)
def score_latents(evaluation: EvaluationPlan, output_dir: str, chunk_atoms: int, reference_file: str) -> str:
    """Every score, per atom and per structure, of one evaluation; returns the scores file."""
    configure_process()
    return score_evaluation(evaluation, output_dir, chunk_atoms, reference_file)
