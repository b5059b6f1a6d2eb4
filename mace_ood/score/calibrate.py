"""Calibration: a score as a percentile of the family's own training-set distribution."""

from __future__ import annotations

import numpy as np
import pandas as pd

from mace_ood.config import SelectConfig
from mace_ood.records import EvaluationPlan
from mace_ood.score.compute import ALL_SCORES


def percentile_against(values: np.ndarray, reference_values: np.ndarray) -> np.ndarray:
    """Percent of the reference distribution at or below each value (NaN without a reference)."""
    reference_values = np.sort(np.asarray(reference_values, dtype=float)[np.isfinite(reference_values)])
    if reference_values.size == 0:
        return np.full(len(values), np.nan)
    return 100.0 * np.searchsorted(reference_values, values, side="right") / reference_values.size


def reference_evaluation(evaluations: list[EvaluationPlan], family: str) -> EvaluationPlan:
    """The evaluation of ``family`` on its own training set."""
    return next(e for e in evaluations if e.family == family and e.reference)


def add_percentiles(tables: dict[str, pd.DataFrame], evaluations: list[EvaluationPlan], select: SelectConfig) -> None:
    """``<score>_percentile`` against the family's own training set, and the ``ood`` flag."""
    for evaluation in evaluations:
        table = tables[evaluation.label]
        reference = tables[reference_evaluation(evaluations, evaluation.family).label]
        for score in [c for c in ALL_SCORES if c in table.columns]:
            table[f"{score}_percentile"] = percentile_against(table[score].to_numpy(), reference[score].to_numpy())
        table["ood"] = table[f"{select.score}_percentile"] > select.ood_percentile
