"""The report stage: every evaluation's table, selection, files and pictures of one run."""

from __future__ import annotations

import logging
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
from mace_ood.report.tables import evaluation_table, order_columns, rank_table, read_descriptors
from mace_ood.runtime import hdf5_in_this_thread
from mace_ood.score.calibrate import (
    alpha_note,
    calibrate_run,
    calibration_mask,
    reference_evaluation,
)
from mace_ood.score.compute import COMBINED_SCORE
from mace_ood.select.batch import select_structures

log = logging.getLogger(__name__)


@hdf5_in_this_thread()
def build_report(
    config: RunConfig,
    evaluations: list[EvaluationPlan],
    score_files: list[str],
    skipped: list[SkippedStructure],
) -> ReportResult:
    """Calibrate, select and write: scores.csv, the selected CIF/extxyz, skipped.csv, report.xlsx,
    plots and chemiscope files; returns paths, one summary per evaluation and the first picks."""
    output_dir = Path(config.output_dir)
    selected, summary_rows = {}, []
    score = config.select.score
    files = dict(zip([e.label for e in evaluations], score_files, strict=True))
    by_label = {
        e.label: evaluation_table(files[e.label], e.family, e.dataset, e.reference, None, config.metadata.patterns)
        for e in evaluations
    }
    delivered = calibrate_run(by_label, evaluations, files, config.select, config.scores.split_block_frames)
    for family, flag in delivered.items():
        components = flag["components"]
        log.info("%s: ranking by %s%s", family, score,
                 f" = the most surprising of {', '.join(components)}" if score == COMBINED_SCORE else "")
        left_out = [c for c in config.select.combine if c not in components]
        if score == COMBINED_SCORE and left_out:
            log.warning("%s: combined leaves out %s (not computed in this run%s)", family, ", ".join(left_out),
                        "; `forces: true` computes force scores" if not config.forces else "")
        (log.warning if flag["effective_alpha"] > flag["alpha"] else log.info)("%s", alpha_note(family, flag))
    if score not in next(iter(by_label.values())).columns:
        raise ValueError(f"select.score {score!r} was not computed in this run")
    by_label = {label: rank_table(table, score) for label, table in by_label.items()}
    shown = [e for e in evaluations if e.shown]
    for evaluation in shown:
        table = by_label[evaluation.label]
        own = reference_evaluation(evaluations, evaluation.family)
        training = by_label[own.label]
        selection = select_structures(
            table, config.select, read_descriptors(files[evaluation.label], table["structure_id"]),
            read_descriptors(files[own.label], training["structure_id"]), training["structure_id"].to_numpy(),
            reference=evaluation.reference,
        )
        table["selected"] = pd.Series(
            selection.rows["selected"].to_numpy(), index=selection.rows.index
        ).reindex(table.index).astype("Int64")
        written = write_selected(selection.rows, files[evaluation.label], top_dir(output_dir, evaluation.label), score)
        selected[evaluation.label] = order_columns(written, score)
        if selection.note:
            log.warning("%s: %s", evaluation.label, selection.note)
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
            "alpha": config.select.alpha,
            "n_calibration": delivered[evaluation.family]["n_calibration"],
            "delivered_rate": delivered[evaluation.family]["delivered_rate"],
            "combined_of": ",".join(delivered[evaluation.family]["components"]) if score == COMBINED_SCORE else "",
            "alpha_note": alpha_note(evaluation.family, delivered[evaluation.family]),
            "strategy": selection.strategy,
            "n_selected": len(selection.rows),
            "n_selected_ood": int(selection.rows["ood"].sum()),
            "selection_note": selection.note,
            "top_structure": table.iloc[0]["structure_id"],
            "top_dir": str(top_dir(output_dir, evaluation.label)),
        })
    tables = [by_label[e.label] for e in shown]
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
    for evaluation in shown:
        reference = reference_evaluation(evaluations, evaluation.family)
        title = f"{evaluation.family} on {evaluation.dataset}"
        plot_latent_pca(
            evaluation.latent_paths[0], reference.latent_paths[0], files[evaluation.label], score,
            latent_pca_plot_path(output_dir, evaluation.label), title,
        )
        write_chemiscope(
            by_label[evaluation.label], files[evaluation.label], evaluation.latent_paths[0],
            chemiscope_path(output_dir, evaluation.label), score,
        )
    paths["latent_pca_plots"] = str(output_dir / "plots")
    paths["chemiscope"] = str(output_dir / "chemiscope")
    calibration = []
    for evaluation in shown:
        training = by_label[reference_evaluation(evaluations, evaluation.family).label]
        calibration.append(training[calibration_mask(training)])
    plot = plot_score_histograms(
        tables, calibration, score, config.select.alpha, histogram_path(output_dir, score),
    )
    if plot:
        paths["histogram_png"] = plot
    return {
        "paths": paths,
        "summary": summary.to_dict(orient="records"),
        "top": {
            label: frame.head(5)[["selected", "rank", score, f"{score}_pvalue", "ood", "structure_id", "formula",
                                  "n_atoms", "group_size", "nearest_training_id"]]
            .rename(columns={score: "score", f"{score}_pvalue": "pvalue"}).to_dict(orient="records")
            for label, frame in selected.items()
        },
    }


def format_summary(result: ReportResult) -> str:
    """Terminal summary: the first 5 picks per evaluation and where the files are."""
    lines = []
    for row in result["summary"]:
        ref = " (own training set)" if row["reference"] else ""
        lines.append(
            f"\n{row['family']} -> {row['dataset']}{ref}: {row['n_structures']} structures, "
            f"{row['n_atoms']} atoms; {row['n_ood']} flagged ood (p <= {row['alpha']:g} against "
            f"{row['n_calibration']} held-out training structures, {row['score']}"
            + (f" of {row['combined_of'].replace(',', ', ')}" if row["combined_of"] else "")
            + f"); {row['strategy']} selection of {row['n_selected']}"
        )
        if row["delivered_rate"] > row["alpha"] + 1e-12:
            lines.append(f"  note: the flag's false-flag rate is {row['delivered_rate']:.3f}, not {row['alpha']:g}: "
                         f"{row['n_calibration']} calibration structures are too few")
        if row.get("selection_note"):
            lines.append(f"  note: {row['selection_note']}")
        lines.append(f"  {'pick':>4}  {'rank':>4}  {row['score']:>15}  {'p':>7}  {'n_atoms':>7}  structure")
        for top in result["top"][row["evaluation"]]:
            lines.append(
                f"  {top['selected']:>4}  {top['rank']:>4}  {top['score']:>15.4e}  {top['pvalue']:>7.3f}  "
                f"{top['n_atoms']:>7}  {top['structure_id']} ({top['formula']})"
            )
        lines.append(f"  files: {row['top_dir']}")
    lines.append("")
    for key, path in result["paths"].items():
        lines.append(f"{key:>16}: {path}")
    return "\n".join(lines)
