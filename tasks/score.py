"""Scoring and report tasks (run in the flow's process; they read the latent files lazily)."""

from __future__ import annotations

import re

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
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
    """scores.csv, top-K structures, skipped.csv, report.xlsx; returns paths and the top rows.

    Also publishes, for the Prefect UI, a table artifact of the top K of each evaluation and
    a markdown summary with the file locations.
    """
    result = build_report(config, evaluations, score_files, skipped)
    publish_artifacts(result, config)
    return result


def artifact_key(*parts: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


def publish_artifacts(result: dict, config: RunConfig) -> None:
    import pandas as pd

    score = config.select.score
    for row in result["summary"]:
        top = pd.read_csv(result["paths"]["scores_csv"])
        top = top[(top.family == row["family"]) & (top.dataset == row["dataset"])].nsmallest(config.select.top_k, "rank")
        columns = ["rank", score, f"{score}_percentile", "ood", "structure_id", "formula", "n_atoms", "source_file"]
        create_table_artifact(
            key=artifact_key("top", row["family"], row["dataset"]),
            table=top[columns].round(6).to_dict(orient="records"),
            description=f"Top {config.select.top_k} of {row['family']} on {row['dataset']} by {score}",
        )
    lines = [f"# mace-ood: {config.output_dir}", "", f"Ranking score: `{score}`; OOD flag above the "
             f"{config.select.ood_percentile:g}th percentile of each family's own training set.", "",
             "| evaluation | structures | atoms | flagged OOD | top structure |", "|---|---|---|---|---|"]
    for row in result["summary"]:
        lines.append(f"| {row['family']} on {row['dataset']} | {row['n_structures']} | {row['n_atoms']} | "
                     f"{row['n_ood']} | {row['top_structure']} |")
    lines += ["", "## Files", ""] + [f"- {name}: `{path}`" for name, path in result["paths"].items()]
    create_markdown_artifact(key=artifact_key("mace-ood-summary"), markdown="\n".join(lines),
                             description="Run summary and where the outputs are")
