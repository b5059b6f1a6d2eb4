"""Calibration against the held-out part of the family's own training set: percentiles, the
conformal ``ood`` flag, and the ``combined`` score (the rules: :mod:`mace_ood.score.conformal`).

The reference statistics are fitted on the *fit* part of the training set only (see
:mod:`mace_ood.score.reference`); every number here is taken against the *calibration*
part, whose atoms were never seen by the fit, so no structure is measured against itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from mace_ood.config import SelectConfig
from mace_ood.records import EvaluationPlan
from mace_ood.score.compute import ALL_SCORES, COMBINED_SCORE
from mace_ood.score.conformal import (
    Pool,
    combined_from_log_pvalues,
    conformal_pvalue,
    delivered_rate,
    effective_alpha,
    sidak_log_pvalue,
)
from mace_ood.score.reference import structure_atom_rows

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


@dataclass
class AtomCalibration:
    """One per-atom score of the calibration structures' atoms, for the size-aware p-value of a
    ``<score>_max``; with each calibration structure's own atoms at or above its max (to leave out)."""

    pool: Pool
    own_at_or_above: dict[str, int]
    own_count: dict[str, int]


def read_atom_calibration(scores_file: str | Path, calibration_ids: list[str], names: list[str]) -> dict[str, AtomCalibration]:
    """Per ``<score>_max`` in ``names``: the calibration atoms' per-atom values (``atom_<score>``)."""
    out: dict[str, AtomCalibration] = {}
    with xr.open_dataset(scores_file, engine="netcdf4") as ds:
        ids = ds["structure_id"].values.astype(str)
        which = np.isin(ids, list(calibration_ids))
        counts = ds["n_atoms"].values[which]
        starts = np.r_[0, np.cumsum(counts)[:-1]].astype(np.int64)
        rows = structure_atom_rows(ds["atom_offset"].values, ds["n_atoms"].values, which)
        for name in names:
            per_atom = f"atom_{name.removesuffix('_max')}"
            if not name.endswith("_max") or per_atom not in ds:
                continue
            values = np.asarray(ds[per_atom].values, dtype=float)[rows]
            at_max: np.ndarray | list = []
            if len(rows):
                maxima = np.repeat(np.maximum.reduceat(values, starts), counts)
                at_max = np.add.reduceat((values >= maxima).astype(np.int64), starts)
            out[name] = AtomCalibration(
                Pool.of(values), dict(zip(ids[which], map(int, at_max), strict=True)),
                dict(zip(ids[which], map(int, counts), strict=True)),
            )
    return out


def component_log_pvalues(
    table: pd.DataFrame, name: str, calibration_rows: pd.DataFrame, own_rows: np.ndarray,
    atoms: AtomCalibration | None,
) -> np.ndarray:
    """log p of one component per row of ``table``: a ``_max`` with its calibration atoms is
    size-aware (Sidak over the structure's atoms), anything else is against the calibration
    structures. ``own_rows``: rows that are calibration structures (left out of their own pool)."""
    values = table[name].to_numpy(dtype=float)
    if atoms is not None:
        ids = table["structure_id"].astype(str).to_numpy()
        own_ge = np.where(own_rows, [atoms.own_at_or_above.get(i, 0) for i in ids], 0)
        own_n = np.where(own_rows, [atoms.own_count.get(i, 0) for i in ids], 0)
        log_atom = atoms.pool.log_pvalue(values, own_ge, own_n)
        return sidak_log_pvalue(log_atom, table["n_atoms"].to_numpy())
    pool = Pool.of(calibration_rows[name].to_numpy(dtype=float))
    own = (own_rows & np.isfinite(values)).astype(float)
    return pool.log_pvalue(values, own, own)


def add_percentiles(
    tables: dict[str, pd.DataFrame],
    evaluations: list[EvaluationPlan],
    select: SelectConfig,
    atom_calibration: dict[str, dict[str, AtomCalibration]] | None = None,
) -> dict[str, dict]:
    """Per evaluation, against the calibration part of the family's own training set: the
    ``combined`` score and its ``combined_driver`` (:mod:`mace_ood.score.conformal`),
    ``<score>_percentile`` for every score, the ranking score's conformal ``<score>_pvalue`` and
    the ``ood`` flag (p-value at most ``select.alpha``, or 1 / (n + 1) when n is too small).

    ``atom_calibration``: per family, :func:`read_atom_calibration` of its training set, which
    makes ``_max`` components size-aware. Returns per family what the flag could deliver
    (n_calibration, alpha, effective_alpha, delivered_rate, the components)."""
    atom_calibration = atom_calibration or {}
    delivered = {}
    for family in dict.fromkeys(e.family for e in evaluations):
        own_label = reference_evaluation(evaluations, family).label
        reference = tables[own_label]
        calibration_rows = reference[calibration_mask(reference)]
        components = combined_components(reference, select)
        atoms = atom_calibration.get(family, {})
        family_tables = {e.label: tables[e.label] for e in evaluations if e.family == family}
        own = {label: (calibration_mask(t) if label == own_label else np.zeros(len(t), dtype=bool))
               for label, t in family_tables.items()}
        for label, table in family_tables.items():
            if components:
                logs = {name: component_log_pvalues(table, name, calibration_rows, own[label], atoms.get(name))
                        for name in components}
                table[COMBINED_SCORE], table[f"{COMBINED_SCORE}_driver"] = combined_from_log_pvalues(logs)
        calibration_rows = reference[calibration_mask(reference)]  # now with the combined score
        flag_of = {label: _flag_statistic(t, select.score, calibration_rows, own[label], atoms.get(select.score))
                   for label, t in family_tables.items()}
        calibration_flag = flag_of[own_label][calibration_mask(reference)]
        n_calibration = int(np.isfinite(calibration_flag).sum())
        level = effective_alpha(select.alpha, n_calibration)
        for label, table in family_tables.items():
            for score in [c for c in ALL_SCORES if c in table.columns]:
                table[f"{score}_percentile"] = percentile_against(
                    table[score].to_numpy(), calibration_rows[score].to_numpy()
                )
            table[f"{select.score}_pvalue"] = conformal_pvalue(flag_of[label], calibration_flag, own[label])
            table["ood"] = (table[f"{select.score}_pvalue"] <= level + 1e-12).to_numpy()
        delivered[family] = {
            "n_calibration": n_calibration, "alpha": select.alpha, "effective_alpha": level,
            "delivered_rate": delivered_rate(select.alpha, n_calibration), "components": components,
        }
    return delivered


def _flag_statistic(table: pd.DataFrame, score: str, calibration_rows: pd.DataFrame, own_rows: np.ndarray,
                    atoms: AtomCalibration | None) -> np.ndarray:
    """What the flag's conformal p-value is taken of: the score itself, or for a ``_max`` score
    with calibration atoms its size-aware surprise (-log p of the Sidak-adjusted atom p-value)."""
    if atoms is not None and score.endswith("_max"):
        return -component_log_pvalues(table, score, calibration_rows, own_rows, atoms)
    return table[score].to_numpy(dtype=float)


def alpha_note(family: str, delivered: dict) -> str:
    """One line on what the flag can deliver with this calibration set, in words."""
    n, alpha, rate = delivered["n_calibration"], delivered["alpha"], delivered["delivered_rate"]
    if n == 0:
        return f"{family}: no calibration structures: no structure can be flagged ood"
    if delivered["effective_alpha"] > alpha:
        return (f"{family}: {n} calibration structures cannot deliver alpha = {alpha:g} (the smallest p-value is "
                f"1/{n + 1} = {1 / (n + 1):.3f}); ood flags structures above every calibration structure, a "
                f"false-flag rate of {rate:.3f} on in-distribution data. Hold out more (scores.calibration_fraction) "
                f"or add training data: alpha = {alpha:g} needs {math.ceil(1 / alpha) - 1} or more")
    return f"{family}: {n} calibration structures; ood at alpha = {alpha:g} delivers a false-flag rate of {rate:.4f}"
