"""Calibration against the held-out part of the family's own training set: percentiles, the
``ood`` flag, and the ``combined`` score.

The reference statistics are fitted on the *fit* part of the training set only (see
:mod:`mace_ood.score.reference`); every number here is taken against the *calibration*
part, whose atoms were never seen by the fit, so no structure is measured against itself.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from mace_ood.config import SelectConfig
from mace_ood.records import EvaluationPlan
from mace_ood.score.compute import ALL_SCORES, COMBINED_SCORE

CALIBRATION_SPLITS = ("calibration", "fit+calibration")  # the latter: too few structures to split


def percentile_against(values: np.ndarray, reference_values: np.ndarray) -> np.ndarray:
    """Percent of the reference distribution at or below each value (NaN without a reference, and
    for a NaN value: a score that could not be computed is not evidence of being OOD)."""
    reference_values = np.sort(np.asarray(reference_values, dtype=float)[np.isfinite(reference_values)])
    if reference_values.size == 0:
        return np.full(len(values), np.nan)
    values = np.asarray(values, dtype=float)
    percent = 100.0 * np.searchsorted(reference_values, values, side="right") / reference_values.size
    return np.where(np.isnan(values), np.nan, percent)


def exceedance(values: np.ndarray, calibration_values: np.ndarray, upper: float = 99.0) -> np.ndarray:
    """How far beyond the calibration distribution: (x - median) / (upper percentile - median).

    0 at the calibration median, 1 at its ``upper`` percentile; unbounded above, so far-out
    structures stay ranked (a percentile saturates at 100).
    """
    calibration_values = np.asarray(calibration_values, dtype=float)
    calibration_values = calibration_values[np.isfinite(calibration_values)]
    if calibration_values.size == 0:
        return np.full(len(values), np.nan)
    median, high = np.percentile(calibration_values, [50.0, upper])
    spread = high - median
    if not spread > 0:
        spread = max(float(np.std(calibration_values)), 1e-12 * max(abs(median), 1.0))
    return (np.asarray(values, dtype=float) - median) / spread


def combine_exceedances(values: dict[str, np.ndarray], calibration: dict[str, np.ndarray]) -> np.ndarray:
    """The combined score: the mean over scores of asinh(exceedance).

    asinh is linear near the calibration range and logarithmic far beyond it, so no single
    score with a heavy tail (a GMM log-likelihood, say) outvotes the others.
    """
    if not values:
        raise ValueError("the combined score needs at least one component score")
    parts = [np.arcsinh(exceedance(values[name], calibration[name])) for name in values]
    return np.mean(parts, axis=0)


def combined_components(table: pd.DataFrame, select: SelectConfig) -> list[str]:
    """The scores of ``select.combine`` that this run computed (all finite somewhere)."""
    return [name for name in select.combine if name in table.columns and np.isfinite(table[name]).any()]


def calibration_mask(reference_table: pd.DataFrame) -> np.ndarray:
    """Rows of the family's own training set that the reference was not fitted on."""
    if "split" not in reference_table.columns:
        return np.ones(len(reference_table), dtype=bool)
    return reference_table["split"].isin(CALIBRATION_SPLITS).to_numpy()


def reference_evaluation(evaluations: list[EvaluationPlan], family: str) -> EvaluationPlan:
    """The evaluation of ``family`` on its own training set."""
    return next(e for e in evaluations if e.family == family and e.reference)


def add_percentiles(tables: dict[str, pd.DataFrame], evaluations: list[EvaluationPlan], select: SelectConfig) -> None:
    """Per evaluation: the ``combined`` score, ``<score>_percentile`` against the calibration part of
    the family's own training set, and the ``ood`` flag (ranking score above ``ood_percentile``)."""
    for family in dict.fromkeys(e.family for e in evaluations):
        reference = tables[reference_evaluation(evaluations, family).label]
        calibration_rows = reference[calibration_mask(reference)]
        components = combined_components(reference, select)
        calibration = {name: calibration_rows[name].to_numpy() for name in components}
        for evaluation in [e for e in evaluations if e.family == family]:
            table = tables[evaluation.label]
            if components:
                table[COMBINED_SCORE] = combine_exceedances(
                    {name: table[name].to_numpy() for name in components}, calibration
                )
        calibration_rows = reference[calibration_mask(reference)]  # now with the combined score
        for evaluation in [e for e in evaluations if e.family == family]:
            table = tables[evaluation.label]
            for score in [c for c in ALL_SCORES if c in table.columns]:
                table[f"{score}_percentile"] = percentile_against(
                    table[score].to_numpy(), calibration_rows[score].to_numpy()
                )
            table["ood"] = table[f"{select.score}_percentile"] > select.ood_percentile
