"""The report stage: every evaluation's table, selection, files and pictures of one run."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from mace_ood.config import RunConfig
from mace_ood.files import write_csv
from mace_ood.paths import RunPaths
from mace_ood.records import (
    EvaluationPlan,
    ReportResult,
    SelectionResult,
    SkippedStructure,
    own_evaluation,
)
from mace_ood.report.chemiscope import write_chemiscope
from mace_ood.report.excel import write_excel
from mace_ood.report.plots import plot_latent_pca, plot_score_histograms
from mace_ood.report.structures import write_selected
from mace_ood.report.tables import order_columns
from mace_ood.runtime import hdf5_in_this_thread
from mace_ood.score.reference import calibration_mask
from mace_ood.score.tables import metadata_table
from mace_ood.select.table import picks, read_selection, read_selection_summary

log = logging.getLogger(__name__)


def rendered_table(output_dir: Path, evaluation: EvaluationPlan, patterns: list[str] | tuple[str, ...]) -> pd.DataFrame:
    """The select stage's decisions for one evaluation, with the structures' metadata (``atoms.info``
    and file-name fields) read from its scores file."""
    import xarray as xr

    decisions = read_selection(output_dir, evaluation.label)
    with xr.open_dataset(RunPaths(output_dir).scores(evaluation.label), engine="netcdf4") as ds:
        meta = metadata_table(ds, patterns)
    meta = meta[["structure_id", *[c for c in meta.columns if c not in decisions.columns]]]
    return decisions.merge(meta, on="structure_id", how="left", validate="one_to_one")


@hdf5_in_this_thread()
def build_report(
    config: RunConfig,
    evaluations: list[EvaluationPlan],
    selections: list[SelectionResult],
    skipped: list[SkippedStructure],
) -> ReportResult:
    """Render what the select stage decided: scores.csv, the selected CIF/extxyz, skipped.csv,
    report.xlsx, plots and chemiscope files; returns paths, one summary per evaluation and the
    first picks. Calibrates nothing and selects nothing."""
    output_dir = Path(config.output_dir)
    run_paths = RunPaths(output_dir)
    score = config.select.score
    decided = {record["label"] for record in selections}
    missing = [e.label for e in evaluations if e.label not in decided]
    if missing:
        raise ValueError(f"no selection for {', '.join(missing)}: the select stage did not run for them")
    shown = [e for e in evaluations if e.shown]
    needed = {*(e.label for e in shown), *(own_evaluation(evaluations, e.family).label for e in shown)}
    tables = {e.label: rendered_table(output_dir, e, config.metadata.patterns) for e in evaluations
              if e.label in needed}
    summaries = {e.label: read_selection_summary(output_dir, e.label) for e in shown}
    selected = {}
    for evaluation in shown:
        scores_file = run_paths.scores(evaluation.label)
        written = write_selected(picks(tables[evaluation.label]), scores_file, run_paths.top(evaluation.label), score)
        selected[evaluation.label] = order_columns(written, score)
    shown_tables = [tables[e.label] for e in shown]
    all_scores = order_columns(pd.concat(shown_tables, ignore_index=True), score)
    skipped_frame = pd.DataFrame(
        skipped, columns=["family", "seed", "dataset", "structure_id", "source_file", "frame_index", "reason"]
    )
    if len(skipped_frame):  # one row per structure and reason, with the seeds that skipped it
        keys = ["family", "dataset", "structure_id", "source_file", "frame_index", "reason"]
        skipped_frame = (
            skipped_frame.astype({"seed": str}).groupby(keys, sort=False, dropna=False)["seed"]
            .agg(",".join).rename("seeds").reset_index()
        )
    summary = pd.DataFrame([{k: v for k, v in summaries[e.label].items() if k != "error_model"} for e in shown])
    paths = {
        "run_config": str(run_paths.manifest),  # written when the run was planned
        "scores_csv": str(write_csv(all_scores, run_paths.scores_csv)),
        "skipped_csv": str(write_csv(skipped_frame, run_paths.skipped_csv)),
        "report_xlsx": str(write_excel(run_paths.report_xlsx, summary, selected, skipped_frame, score)),
    }
    for evaluation in shown:
        reference = own_evaluation(evaluations, evaluation.family)
        title = f"{evaluation.family} on {evaluation.dataset}"
        scores_file = run_paths.scores(evaluation.label)
        plot_latent_pca(
            evaluation.latent_paths[0], reference.latent_paths[0], scores_file, score,
            run_paths.latent_pca_plot(evaluation.label), title,
        )
        write_chemiscope(tables[evaluation.label], scores_file, evaluation.latent_paths[0],
                         run_paths.chemiscope(evaluation.label), score)
    paths["latent_pca_plots"] = str(run_paths.plots_dir)
    paths["chemiscope"] = str(run_paths.chemiscope_dir)
    calibration = []
    for evaluation in shown:
        training = tables[own_evaluation(evaluations, evaluation.family).label]
        calibration.append(training[calibration_mask(training)])
    plot = plot_score_histograms(
        shown_tables, calibration, [summaries[e.label]["threshold"] for e in shown], score, config.select.alpha,
        run_paths.histogram(score),
    )
    if plot:
        paths["histogram_png"] = plot
    return {
        "paths": paths,
        "summary": summary.to_dict(orient="records"),
        "top": {
            label: frame.head(5)[["selected", "rank", score, f"{score}_pvalue", "ood", "structure_id", "formula",
                                  "n_atoms", "group_size", "nearest_training_id",
                                  *[c for c in ("predicted_force_rmse", "force_rmse_upper", "force_rmse_lower", "force_rmse_is_lower_bound")
                                    if c in frame.columns]]]
            .rename(columns={score: "score", f"{score}_pvalue": "pvalue"}).to_dict(orient="records")
            for label, frame in selected.items()
        },
    }


def format_force_rmse(row: dict) -> str:
    """``0.052 (<= 0.110)`` inside the validation range, ``>= 0.140`` beyond it (its bound from below)."""
    if row.get("force_rmse_is_lower_bound"):
        return f">= {row['force_rmse_lower']:.3f}"
    upper = row.get("force_rmse_upper")
    return f"{row['predicted_force_rmse']:.3f}" + (f" (<= {upper:.3f})" if pd.notna(upper) else "")


def format_summary(result: ReportResult) -> str:
    """Terminal summary: the first 5 picks per evaluation and where the files are."""
    lines = []
    for row in result["summary"]:
        ref = " (own training set)" if row["reference"] else ""
        lines.append(
            f"\n{row['family']} -> {row['dataset']}{ref}: {row['n_structures']} structures, "
            f"{row['n_atoms']} atoms; {row['n_ood']} flagged ood (p <= {row['alpha']:g} against "
            f"{row['n_calibration']} training structures scored out of fold, each of their "
            f"{row.get('n_groups', '?')} runs counted once; {row['score']}"
            + (f" of {row['combined_of'].replace(',', ', ')}" if row["combined_of"] else "")
            + f"); {row['strategy']} selection of {row['n_selected']}"
        )
        if row.get("n_models") == 1:
            lines.append("  note: 1 model: every score but the seed-variance and committee ones (they need 2 or more "
                         "models)")
        if row["delivered_rate"] > row["alpha"] + 1e-12:
            lines.append(f"  note: the flag's false-flag rate is at most {row['delivered_rate']:.3f}, not {row['alpha']:g}: "
                         f"{row['n_groups']} independent runs are too few (add runs, or name them with scores.group_by)")
        if row.get("selection_note"):
            lines.append(f"  note: {row['selection_note']}")
        if isinstance(row.get("error_note"), str) and row["error_note"]:
            lines.append(f"  {row['error_note']}")
        errors = any("predicted_force_rmse" in top for top in result["top"][row["evaluation"]])
        lines.append(f"  {'pick':>4}  {'rank':>4}  {row['score']:>15}  {'p':>7}  {'n_atoms':>7}  "
                     + ("F-RMSE eV/A (bound)  " if errors else "") + "structure")
        for top in result["top"][row["evaluation"]]:
            error = f"{format_force_rmse(top):<20} " if errors else ""
            lines.append(
                f"  {top['selected']:>4}  {top['rank']:>4}  {top['score']:>15.4e}  {top['pvalue']:>7.3f}  "
                f"{top['n_atoms']:>7}  {error}{top['structure_id']} ({top['formula']})"
            )
        lines.append(f"  files: {row['top_dir']}")
    lines.append("")
    for key, path in result["paths"].items():
        lines.append(f"{key:>16}: {path}")
    return "\n".join(lines)
