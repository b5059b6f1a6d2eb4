"""Scoring and report tasks (run in the flow's process; they read the latent files lazily)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from mace_ood.config import RunConfig
from mace_ood.pipeline import EvaluationPlan, build_report, score_evaluation


@task(name="score", task_run_name="score {evaluation.family} on {evaluation.dataset}", cache_policy=NO_CACHE)
def score_latents(evaluation: EvaluationPlan, output_dir: str, chunk_atoms: int) -> str:
    """Latent variance per atom and per structure of one evaluation; returns the scores file."""
    return score_evaluation(evaluation, output_dir, chunk_atoms)


@task(name="report", cache_policy=NO_CACHE)
def write_report(
    config: RunConfig, evaluations: list[EvaluationPlan], score_files: list[str], skipped: list[dict]
) -> dict:
    """scores.csv, top-K structures, skipped.csv, report.xlsx; returns paths and the top rows."""
    return build_report(config, evaluations, score_files, skipped)
