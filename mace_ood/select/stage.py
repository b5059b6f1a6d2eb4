"""The select stage: calibrate one evaluation against its family's training structures (out of fold),
rank, flag and pick, and write what was decided (:mod:`mace_ood.select.table`).

Runs after scoring, one evaluation at a time (a Prefect task on a Dask worker in a run); the
report only renders what this wrote, and ``mace-ood evaluate`` reads it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from mace_ood.config import ScoresConfig, SelectConfig
from mace_ood.extract.devices import worker_label
from mace_ood.paths import RunPaths
from mace_ood.records import (
    EvaluationPlan,
    EvaluationSummary,
    SelectionResult,
    own_evaluation,
    validation_evaluations,
)
from mace_ood.runtime import hdf5_in_this_thread
from mace_ood.score.calibrate import (
    alpha_note,
    calibrate_run,
    grouping_ids,
    groups_of_scores,
    structure_groups,
)
from mace_ood.score.compute import COMBINED_SCORE, FORCE_SCORES
from mace_ood.score.conformal import group_threshold
from mace_ood.score.errors import ErrorModel, add_predicted_errors, fit_error_model, force_errors
from mace_ood.score.reference import calibration_mask
from mace_ood.score.tables import evaluation_table, rank_table, read_descriptors
from mace_ood.select.batch import select_structures
from mace_ood.select.table import PICK_COLUMNS, write_selection
from mace_ood.structures import InputError

log = logging.getLogger(__name__)


@hdf5_in_this_thread()
def select_evaluation(
    evaluation: EvaluationPlan,
    own: EvaluationPlan,
    output_dir: str | Path,
    select: SelectConfig,
    scores: ScoresConfig | None = None,
    validation: EvaluationPlan | None = None,
    forces_key: str = "REF_forces",
) -> SelectionResult:
    """Calibrate, rank, flag, predict the force error and (for an evaluation that is shown) pick;
    write the decisions.

    ``own``: the family's evaluation on its own training set (the calibration split lives there).
    ``validation``: the family's evaluation on its labelled validation dataset (reference forces
    under ``forces_key``): the ranking score is mapped to ``predicted_force_rmse`` and
    ``force_rmse_upper`` there (:mod:`mace_ood.score.errors`). Reads the scores files under
    ``output_dir``; writes ``selection/<label>.csv`` and ``.json``.
    """
    started = time.perf_counter()
    scores = scores or ScoresConfig()
    output_dir = Path(output_dir)
    evaluations = list({e.label: e for e in (own, validation, evaluation) if e is not None}.values())
    files = {e.label: RunPaths(output_dir).scores(e.label) for e in evaluations}
    tables = {e.label: evaluation_table(files[e.label], e.family, e.dataset, e.reference, None, metadata=False)
              for e in evaluations}
    delivered = calibrate_run(tables, evaluations, files, select, scores.split_block_frames)[evaluation.family]
    score = select.score
    if score not in tables[evaluation.label].columns:
        raise ValueError(f"select.score {score!r} was not computed in this run")
    _log_ranking(evaluation, select, delivered)
    error_model = None
    if validation is not None:
        error_model, fitted_ids = fit_validation_errors(
            tables[validation.label], files[validation.label], score, select.error_level, forces_key, scores,
            validation.dataset,
        )
        add_predicted_errors(tables[evaluation.label], error_model)
        if evaluation.label == validation.label:
            tables[evaluation.label]["error_fit"] = tables[evaluation.label]["structure_id"].isin(fitted_ids).to_numpy()
    table = rank_table(tables[evaluation.label], score)
    training = tables[own.label]
    summary = evaluation_summary(table, evaluation, select, delivered, training, output_dir)
    if error_model is not None:
        summary.update(error_model=error_model.as_dict(), validation=validation.dataset,
                       error_note=error_note(error_model, validation.dataset))
    if evaluation.shown:
        selection = select_structures(
            table, select, read_descriptors(files[evaluation.label], table["structure_id"]),
            read_descriptors(files[own.label], training["structure_id"]), training["structure_id"].to_numpy(),
            reference=evaluation.reference,
        )
        for column in PICK_COLUMNS:
            table[column] = selection.rows[column].reindex(table.index)
        table["selected"] = table["selected"].astype("Int64")
        if selection.note:
            log.warning("%s: %s", evaluation.label, selection.note)
        summary.update(strategy=selection.strategy, n_candidates=selection.n_candidates,
                       n_selected=len(selection.rows), n_selected_ood=int(selection.rows["ood"].sum()),
                       selection_note=selection.note)
    table_path, summary_path = write_selection(table, summary, output_dir, evaluation.label)
    return {"label": evaluation.label, "table": str(table_path), "summary": str(summary_path),
            "wall_s": round(time.perf_counter() - started, 3), "worker": worker_label()}


def evaluation_summary(
    table: pd.DataFrame, evaluation: EvaluationPlan, select: SelectConfig, delivered: dict,
    training: pd.DataFrame, output_dir: Path,
) -> EvaluationSummary:
    """The summary row of one evaluation (before its picks): counts, the flag's rate and threshold."""
    score = select.score
    calibration = training.loc[calibration_mask(training)]
    return {
        "evaluation": evaluation.label,
        "family": evaluation.family,
        "dataset": evaluation.dataset,
        "reference": evaluation.reference,
        "n_models": len(evaluation.latent_paths),
        "n_structures": len(table),
        "n_atoms": int(table["n_atoms"].sum()),
        "score": score,
        "median_score": float(table[score].median()),
        "max_score": float(table[score].max()),
        "n_ood": int(table["ood"].sum()),
        "alpha": select.alpha,
        "n_calibration": delivered["n_calibration"],
        "n_groups": delivered["n_groups"],
        "grouping": delivered.get("grouping", ""),
        "delivered_rate": delivered["delivered_rate"],
        "threshold": group_threshold(calibration[score].to_numpy(dtype=float), structure_groups(calibration, 10),
                                     select.alpha),
        "combined_of": ",".join(delivered["components"]) if score == COMBINED_SCORE else "",
        "alpha_note": alpha_note(evaluation.family, delivered),
        "strategy": "",
        "n_candidates": 0,
        "n_selected": 0,
        "n_selected_ood": 0,
        "selection_note": "",
        "top_structure": str(table.iloc[0]["structure_id"]) if len(table) else "",
        "top_dir": str(RunPaths(output_dir).top(evaluation.label)),
    }


def fit_validation_errors(
    table: pd.DataFrame, scores_file: Path, score: str, level: float, forces_key: str, scores: ScoresConfig,
    dataset: str,
) -> tuple[ErrorModel, set[str]]:
    """The family's error model from its validation dataset (its true force RMSE against the committee's
    force deviation, else the ranking score), calibrated over the dataset's runs; and the ids it used."""
    errors = force_errors(scores_file, forces_key)
    if errors is None:
        raise InputError(f"validation dataset {dataset!r}: no structure has reference forces ({forces_key!r} in "
                         "atoms.arrays or a calculator's forces) and model forces (`forces: true`)")
    truth = table["structure_id"].map(errors).to_numpy(dtype=float)
    source = error_input(table, score)
    grouping = groups_of_scores(scores_file, scores)
    groups = pd.Series(grouping.labels, index=grouping_ids(scores_file)).reindex(table["structure_id"]).to_numpy()
    model = fit_error_model(table[source].to_numpy(), truth, groups, source, level)
    used = np.isfinite(truth) & np.isfinite(table[source].to_numpy(dtype=float))
    return model, set(table["structure_id"].to_numpy()[used])


def error_input(table: pd.DataFrame, score: str) -> str:
    """What the force error is predicted from: the committee's force deviation where the run has it
    (errors scale with it; the ranking score is a p-value), else, for a family of one model, LLPR
    propagated to its forces (``llpr_force_std``), else the ranking score."""
    for column in ("force_deviation_mean", "llpr_force_std"):
        if column in table.columns and np.isfinite(table[column]).any():
            return column
    return score


def error_note(model: ErrorModel, dataset: str) -> str:
    """What the predicted force error is, in words."""
    if np.isfinite(model.factor):
        bound = (f"force_rmse_upper = {model.factor:.2f} x predicted covers {model.delivered_level:.0%} of new runs "
                 f"drawn like {dataset}")
        if model.delivered_level < model.level - 1e-9:
            bound += (f" ({model.n_groups} runs cannot deliver {model.level:.0%}: each run counts once, at most "
                      f"G/(G+1); add validation runs)")
    else:
        bound = f"no upper bound: {model.n_groups} validation run(s) are too few"
    return (f"predicted_force_rmse = {model.coefficient:.3g} x {model.score}^{model.exponent:.2f} (power law fitted on "
            f"{model.n_structures} {dataset} structures in {model.n_groups} runs, each run counted once); "
            f"{bound}; beyond {model.score} = {model.largest_input:.3g} (the largest in {dataset}) it is a lower bound "
            "(>=): ensembles underestimate their error far from their data, and no upper bound is given")


# tests/test_forces_off.py measures these (and fails if they move): a Cu-Au alloy test set (hot, strained,
# vacancy, Au-rich and surface cells against new in-distribution runs), the committed 4-run Cu-Au family
FORCES_OFF_ROC_AUC = {"forces": 0.92, "latents only": 0.80}
FORCES_OFF_NOTE = (
    f"without force scores the ranking is worse: on the Cu-Au alloy test set of tests/test_forces_off.py, ROC-AUC "
    f"{FORCES_OFF_ROC_AUC['latents only']:.2f} against {FORCES_OFF_ROC_AUC['forces']:.2f} with `forces: true`"
)


def _log_ranking(evaluation: EvaluationPlan, select: SelectConfig, delivered: dict) -> None:
    score, components = select.score, delivered["components"]
    log.info("%s: ranking by %s%s", evaluation.label, score,
             f" = the most surprising of {', '.join(components)}" if score == COMBINED_SCORE else "")
    left_out = [c for c in select.combine if c not in components]
    if score == COMBINED_SCORE and left_out:
        log.warning("%s: combined leaves out %s (not computed in this run; `forces: true` computes force scores)%s",
                    evaluation.label, ", ".join(left_out),
                    f"; {FORCES_OFF_NOTE}" if any(c in FORCE_SCORES for c in left_out) else "")
    (log.warning if delivered["effective_alpha"] > delivered["alpha"] else log.info)("%s", alpha_note(
        evaluation.family, delivered))


def select_run(
    output_dir: str | Path, evaluations: list[EvaluationPlan], select: SelectConfig | None = None,
    scores: ScoresConfig | None = None, forces_key: str = "REF_forces",
) -> list[SelectionResult]:
    """:func:`select_evaluation` for every evaluation of a run, in this process (what the flow maps
    over its workers)."""
    select = select or SelectConfig()
    labelled = validation_evaluations(evaluations)
    return [select_evaluation(e, own_evaluation(evaluations, e.family), output_dir, select, scores,
                              labelled.get(e.family), forces_key) for e in evaluations]

