"""The report stage: every evaluation's table, selection, files and pictures of one run."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mace_ood.config import RunConfig
from mace_ood.files import write_csv, write_text
from mace_ood.paths import chemiscope_path, histogram_path, latent_pca_plot_path, top_dir
from mace_ood.records import EvaluationPlan, ReportResult, SkippedStructure
from mace_ood.report.chemiscope import write_chemiscope
from mace_ood.report.excel import write_excel
from mace_ood.report.plots import plot_latent_pca, plot_score_histograms
from mace_ood.report.structures import write_selected
from mace_ood.report.tables import evaluation_table, order_columns
from mace_ood.score.calibrate import add_percentiles, reference_evaluation
from mace_ood.select.top import select_top


def build_report(
    config: RunConfig,
    evaluations: list[EvaluationPlan],
    score_files: list[str],
    skipped: list[SkippedStructure],
) -> ReportResult:
    """scores.csv, top-K CIF/extxyz, skipped.csv and report.xlsx; returns paths and top rows."""
    output_dir = Path(config.output_dir)
    selected, summary_rows = {}, []
    top_k = config.select.top_k
    score = config.select.score
    by_label = {
        e.label: evaluation_table(path, e.family, e.dataset, e.reference, score, config.metadata.patterns)
        for e, path in zip(evaluations, score_files, strict=True)
    }
    add_percentiles(by_label, evaluations, config.select)
    shown = [(e, p) for e, p in zip(evaluations, score_files, strict=True) if e.shown]
    tables = [by_label[e.label] for e, _ in shown]
    for evaluation, path in shown:
        table = by_label[evaluation.label]
        top = write_selected(select_top(table, top_k), path, top_dir(output_dir, evaluation.label), score)
        selected[evaluation.label] = order_columns(top, score)
        summary_rows.append({
            "evaluation": evaluation.label,
            "family": evaluation.family,
            "dataset": evaluation.dataset,
            "reference": evaluation.reference,
            "n_structures": len(table),
            "n_atoms": int(table["n_atoms"].sum()),
            "score": score,
            "median_score": float(table[score].median()),
            "max_score": float(table[score].max()),
            "n_ood": int(table["ood"].sum()),
            "ood_percentile": config.select.ood_percentile,
            "top_structure": table.iloc[0]["structure_id"],
            "top_dir": str(top_dir(output_dir, evaluation.label)),
        })
    all_scores = order_columns(pd.concat(tables, ignore_index=True), score)
    skipped_frame = pd.DataFrame(
        skipped, columns=["family", "seed", "dataset", "structure_id", "source_file", "frame_index", "reason"]
    )
    if len(skipped_frame):  # one row per structure and reason, with the seeds that skipped it
        keys = ["family", "dataset", "structure_id", "source_file", "frame_index", "reason"]
        skipped_frame = (
            skipped_frame.astype({"seed": str}).groupby(keys, sort=False, dropna=False)["seed"]
            .agg(",".join).rename("seeds").reset_index()
        )
    summary = pd.DataFrame(summary_rows)
    paths = {
        "run_config": str(write_text(config.model_dump_json(indent=2), output_dir / "run_config.json")),
        "scores_csv": str(write_csv(all_scores, output_dir / "scores.csv")),
        "skipped_csv": str(write_csv(skipped_frame, output_dir / "skipped.csv")),
        "report_xlsx": str(write_excel(output_dir / "report.xlsx", summary, selected, skipped_frame, score)),
    }
    for evaluation, path in shown:
        reference = reference_evaluation(evaluations, evaluation.family)
        title = f"{evaluation.family} on {evaluation.dataset}"
        plot_latent_pca(
            evaluation.latent_paths[0], reference.latent_paths[0], path, score,
            latent_pca_plot_path(output_dir, evaluation.label), title,
        )
        write_chemiscope(
            by_label[evaluation.label], path, evaluation.latent_paths[0],
            chemiscope_path(output_dir, evaluation.label), score,
        )
    paths["latent_pca_plots"] = str(output_dir / "plots")
    paths["chemiscope"] = str(output_dir / "chemiscope")
    plot = plot_score_histograms(
        tables, [by_label[reference_evaluation(evaluations, e.family).label] for e, _ in shown],
        score, config.select.ood_percentile, histogram_path(output_dir, score),
    )
    if plot:
        paths["histogram_png"] = plot
    return {
        "paths": paths,
        "summary": summary.to_dict(orient="records"),
        "top": {
            label: frame.head(5)[["rank", score, f"{score}_percentile", "ood", "structure_id", "formula", "n_atoms"]]
            .rename(columns={score: "score", f"{score}_percentile": "percentile"}).to_dict(orient="records")
            for label, frame in selected.items()
        },
    }


def format_summary(result: ReportResult) -> str:
    """Terminal summary: top 5 per evaluation and where the files are."""
    lines = []
    for row in result["summary"]:
        ref = " (in-distribution reference)" if row["reference"] else ""
        lines.append(
            f"\n{row['family']} -> {row['dataset']}{ref}: {row['n_structures']} structures, "
            f"{row['n_atoms']} atoms; {row['n_ood']} above the {row['ood_percentile']:g}th percentile "
            f"of the training set ({row['score']})"
        )
        lines.append(f"  {'rank':>4}  {row['score']:>15}  {'pctl':>6}  {'n_atoms':>7}  structure")
        for top in result["top"][row["evaluation"]]:
            lines.append(
                f"  {top['rank']:>4}  {top['score']:>15.4e}  {top['percentile']:>6.1f}  {top['n_atoms']:>7}  "
                f"{top['structure_id']} ({top['formula']})"
            )
        lines.append(f"  files: {row['top_dir']}")
    lines.append("")
    for key, path in result["paths"].items():
        lines.append(f"{key:>16}: {path}")
    return "\n".join(lines)
