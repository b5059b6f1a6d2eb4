"""The select stage: calibrate one evaluation against its family's held-out training structures,
rank, flag and pick, and write what was decided (:mod:`mace_ood.select.table`).

Runs after scoring, one evaluation at a time (a Prefect task on a Dask worker in a run); the
report only renders what this wrote, and ``mace-ood evaluate`` reads it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pandas as pd

from mace_ood.config import ScoresConfig, SelectConfig
from mace_ood.extract.devices import worker_label
from mace_ood.paths import scores_path, top_dir
from mace_ood.records import EvaluationPlan, EvaluationSummary, SelectionResult
from mace_ood.runtime import hdf5_in_this_thread
from mace_ood.score.calibrate import alpha_note, calibrate_run
from mace_ood.score.compute import COMBINED_SCORE
from mace_ood.score.conformal import conformal_threshold
from mace_ood.score.reference import calibration_mask
from mace_ood.score.tables import evaluation_table, rank_table, read_descriptors
from mace_ood.select.batch import select_structures
from mace_ood.select.table import PICK_COLUMNS, write_selection

log = logging.getLogger(__name__)


@hdf5_in_this_thread()
def select_evaluation(
    evaluation: EvaluationPlan,
    own: EvaluationPlan,
    output_dir: str | Path,
    select: SelectConfig,
    scores: ScoresConfig | None = None,
) -> SelectionResult:
    """Calibrate, rank, flag and (for an evaluation that is shown) pick; write the decisions.

    ``own``: the family's evaluation on its own training set (the calibration split lives there).
    Reads the two scores files under ``output_dir``; writes ``selection/<label>.csv`` and ``.json``.
    """
    started = time.perf_counter()
    scores = scores or ScoresConfig()
    output_dir = Path(output_dir)
    evaluations = [own] if evaluation.label == own.label else [own, evaluation]
    files = {e.label: scores_path(output_dir, e.label) for e in evaluations}
    tables = {e.label: evaluation_table(files[e.label], e.family, e.dataset, e.reference, None, metadata=False)
              for e in evaluations}
    delivered = calibrate_run(tables, evaluations, files, select, scores.split_block_frames)[evaluation.family]
    score = select.score
    if score not in tables[evaluation.label].columns:
        raise ValueError(f"select.score {score!r} was not computed in this run")
    _log_ranking(evaluation, select, delivered)
    table = rank_table(tables[evaluation.label], score)
    training = tables[own.label]
    summary = evaluation_summary(table, evaluation, select, delivered, training, output_dir)
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
    calibration_values = training.loc[calibration_mask(training), score].to_numpy(dtype=float)
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
        "delivered_rate": delivered["delivered_rate"],
        "threshold": float(conformal_threshold(calibration_values, select.alpha)),
        "combined_of": ",".join(delivered["components"]) if score == COMBINED_SCORE else "",
        "alpha_note": alpha_note(evaluation.family, delivered),
        "strategy": "",
        "n_candidates": 0,
        "n_selected": 0,
        "n_selected_ood": 0,
        "selection_note": "",
        "top_structure": str(table.iloc[0]["structure_id"]) if len(table) else "",
        "top_dir": str(top_dir(output_dir, evaluation.label)),
    }


def _log_ranking(evaluation: EvaluationPlan, select: SelectConfig, delivered: dict) -> None:
    score, components = select.score, delivered["components"]
    log.info("%s: ranking by %s%s", evaluation.label, score,
             f" = the most surprising of {', '.join(components)}" if score == COMBINED_SCORE else "")
    left_out = [c for c in select.combine if c not in components]
    if score == COMBINED_SCORE and left_out:
        log.warning("%s: combined leaves out %s (not computed in this run; `forces: true` computes force scores)",
                    evaluation.label, ", ".join(left_out))
    (log.warning if delivered["effective_alpha"] > delivered["alpha"] else log.info)("%s", alpha_note(
        evaluation.family, delivered))


def select_run(
    output_dir: str | Path, evaluations: list[EvaluationPlan], select: SelectConfig | None = None,
    scores: ScoresConfig | None = None,
) -> list[SelectionResult]:
    """:func:`select_evaluation` for every evaluation of a run, in this process (what the flow maps
    over its workers)."""
    select = select or SelectConfig()
    own_of = {e.family: e for e in evaluations if e.reference}
    return [select_evaluation(e, own_of[e.family], output_dir, select, scores) for e in evaluations]

