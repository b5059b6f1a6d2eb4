"""Prefect UI artifacts: keys, the selection table of each evaluation, the run summary."""

from __future__ import annotations

import re

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from mace_ood.config import RunConfig
from mace_ood.records import ReportResult


def artifact_key(*parts: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


def publish_artifacts(result: ReportResult, config: RunConfig) -> None:
    import pandas as pd

    score = config.select.score
    table = pd.read_csv(result["paths"]["scores_csv"])
    for row in result["summary"]:
        picks = table[(table.family == row["family"]) & (table.dataset == row["dataset"]) & table.selected.notna()]
        picks = picks.sort_values("selected").astype({"selected": int})
        columns = ["selected", "rank", score, f"{score}_pvalue", "ood", "structure_id", "formula", "n_atoms",
                   "source_file"]
        create_table_artifact(
            key=artifact_key("top", row["family"], row["dataset"]),
            table=picks[columns].round(6).to_dict(orient="records"),
            description=f"{row['strategy']} selection of {row['n_selected']} from {row['family']} on "
                        f"{row['dataset']} by {score}" + (f" ({row['selection_note']})" if row["selection_note"] else ""),
        )
    notes = dict.fromkeys(row["alpha_note"] for row in result["summary"])
    combined_of = dict.fromkeys(row["combined_of"] for row in result["summary"] if row["combined_of"])
    lines = [f"# mace-ood: {config.output_dir}", "", f"Ranking score: `{score}`"
             + (f" (the most surprising of {'; '.join(combined_of)})" if combined_of else "")
             + f"; `ood`: conformal p-value at most alpha = {config.select.alpha:g} against the held-out part of "
             "each family's training set.", "", *[f"- {note}" for note in notes], "",
             "| evaluation | structures | atoms | flagged OOD | top structure |", "|---|---|---|---|---|"]
    for row in result["summary"]:
        lines.append(f"| {row['family']} on {row['dataset']} | {row['n_structures']} | {row['n_atoms']} | "
                     f"{row['n_ood']} | {row['top_structure']} |")
    lines += ["", "## Files", ""] + [f"- {name}: `{path}`" for name, path in result["paths"].items()]
    create_markdown_artifact(key=artifact_key("mace-ood-summary"), markdown="\n".join(lines),
                             description="Run summary and where the outputs are")
