"""Scoring and report tasks (run in the flow's process; they read the latent files lazily)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from mace_ood.config import RunConfig, ScoresConfig
from mace_ood.pipeline import EvaluationPlan, build_report, fit_family_reference, score_evaluation


@task(name="fit-reference", task_run_name="fit reference of {evaluation.family}", cache_policy=NO_CACHE)
def fit_reference_task(evaluation: EvaluationPlan, output_dir: str, scores: ScoresConfig) -> str:
    """Alignment, covariance, GMM and k-NN sample of a family's own training set; returns the file."""
    return fit_family_reference(evaluation, output_dir, scores)


@task(name="score", task_run_name="score {evaluation.family} on {evaluation.dataset}", cache_policy=NO_CACHE)
def score_latents(evaluation: EvaluationPlan, output_dir: str, chunk_atoms: int, reference_file: str) -> str:
    """Every score, per atom and per structure, of one evaluation; returns the scores file."""
    return score_evaluation(evaluation, output_dir, chunk_atoms, reference_file)


@task(name="report", cache_policy=NO_CACHE)
def write_report(
    config: RunConfig, evaluations: list[EvaluationPlan], score_files: list[str], skipped: list[dict]
) -> dict:
    """scores.csv, top-K structures, skipped.csv, report.xlsx; returns paths and the top rows."""
    return build_report(config, evaluations, score_files, skipped)
