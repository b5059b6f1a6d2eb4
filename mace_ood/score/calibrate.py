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

from mace_ood.config import ScoresConfig, SelectConfig
from mace_ood.records import EvaluationPlan, own_evaluation
from mace_ood.score.compute import ALL_SCORES, COMBINED_SCORE
from mace_ood.score.conformal import (
    Pool,
    at_or_above_in_group,
    combined_from_log_pvalues,
    delivered_rate,
    effective_alpha,
    group_own_counts,
    group_pvalue,
    sidak_log_pvalue,
)
from mace_ood.score.reference import atom_rows, calibration_mask, split_groups


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


def structure_groups(table: pd.DataFrame, block_frames: int) -> np.ndarray:
    """Each row's group: its run where the table has one (a training set's ``group`` column, written
    with its scores), else its source file name and frame block; each row its own group when the
    table has no file columns."""
    if {"source_file", "frame_index"} <= set(table.columns):
        groups = split_groups(table["source_file"].to_numpy(), table["frame_index"].to_numpy(), block_frames)
        blocks = np.array([f"{name}\0{block}" for name, block in groups], dtype=object)
    else:
        blocks = table["structure_id"].astype(str).to_numpy(dtype=object)
    if "group" in table.columns:
        runs = table["group"].to_numpy(dtype=object)
        known = pd.notna(runs)
        return np.where(known, np.array([f"{r}" for r in runs], dtype=object), blocks)
    return blocks


@dataclass
class AtomCalibration:
    """One per-atom score of the calibration structures' atoms, for the size-aware p-value of a
    ``<score>_max``; per calibration structure, its own group's atoms at or above its max and
    their number (left out of its pool)."""

    pool: Pool
    own_at_or_above: dict[str, int]
    own_count: dict[str, int]


def read_atom_calibration(
    scores_file: str | Path, calibration_ids: list[str], names: list[str], block_frames: int = 10,
) -> dict[str, AtomCalibration]:
    """Per ``<score>_max`` in ``names``: the calibration atoms' per-atom values (``atom_<score>``)."""
    out: dict[str, AtomCalibration] = {}
    with xr.open_dataset(scores_file, engine="netcdf4") as ds:
        ids = ds["structure_id"].values.astype(str)
        which = np.isin(ids, list(calibration_ids))
        counts = ds["n_atoms"].values[which].astype(np.int64)
        starts = np.r_[0, np.cumsum(counts)[:-1]].astype(np.int64)
        rows = atom_rows(ds["atom_offset"].values[which], ds["n_atoms"].values[which])
        groups = structure_groups(pd.DataFrame({
            "structure_id": ids[which], "source_file": ds["source_file"].values.astype(str)[which],
            "frame_index": ds["frame_index"].values[which],
            **({"group": ds["group"].values.astype(str)[which]} if "group" in ds else {}),
        }), block_frames)
        per_atom_values = {}
        for name in names:
            per_atom = f"atom_{name.removesuffix('_max')}"
            if name.endswith("_max") and per_atom in ds:
                per_atom_values[name] = np.asarray(ds[per_atom].values, dtype=float)[rows]
    for name, values in per_atom_values.items():
        own_ge, own_n = {}, {}
        if len(rows):
            maxima = np.maximum.reduceat(values, starts)
            _, codes = np.unique(groups.astype(str), return_inverse=True)
            at_or_above, size = at_or_above_in_group(values, np.repeat(codes, counts), maxima, codes)
            calibration = ids[which]
            own_ge = dict(zip(calibration, at_or_above.tolist(), strict=True))
            own_n = dict(zip(calibration, size.tolist(), strict=True))
        out[name] = AtomCalibration(Pool.of(values), own_ge, own_n)
    return out


def component_log_pvalues(
    table: pd.DataFrame, name: str, calibration_rows: pd.DataFrame, own_rows: np.ndarray,
    atoms: AtomCalibration | None, block_frames: int = 10,
) -> np.ndarray:
    """log p of one component per row of ``table``: a ``_max`` with its calibration atoms is
    size-aware (Sidak over the structure's atoms), anything else is against the calibration
    structures. ``own_rows``: rows that are calibration structures (their group left out)."""
    values = table[name].to_numpy(dtype=float)
    if atoms is not None:
        ids = table["structure_id"].astype(str).to_numpy()
        own_ge = np.where(own_rows, [atoms.own_at_or_above.get(i, 0) for i in ids], 0)
        own_n = np.where(own_rows, [atoms.own_count.get(i, 0) for i in ids], 0)
        log_atom = atoms.pool.log_pvalue(values, own_ge, own_n)
        return sidak_log_pvalue(log_atom, table["n_atoms"].to_numpy())
    pool = Pool.of(calibration_rows[name].to_numpy(dtype=float))
    own_ge, own_n = group_own_counts(values, structure_groups(table, block_frames), own_rows)
    return pool.log_pvalue(values, own_ge, own_n)


def add_percentiles(
    tables: dict[str, pd.DataFrame],
    evaluations: list[EvaluationPlan],
    select: SelectConfig,
    atom_calibration: dict[str, dict[str, AtomCalibration]] | None = None,
    block_frames: int = 10,
) -> dict[str, dict]:
    """Per evaluation, against the calibration part of the family's own training set: the
    ``combined`` score and its ``combined_driver`` (:mod:`mace_ood.score.conformal`),
    ``<score>_percentile`` for every score, the ranking score's conformal ``<score>_pvalue`` and
    the ``ood`` flag (p-value at most ``select.alpha``, or 1 / (n + 1) when n is too small).

    ``atom_calibration``: per family, :func:`read_atom_calibration` of its training set, which
    makes ``_max`` components size-aware. ``block_frames``: the split's frame blocks (a calibration
    structure is compared with the other groups only). Returns per family what the flag can deliver
    (n_calibration, alpha, effective_alpha, delivered_rate, the components)."""
    atom_calibration = atom_calibration or {}
    delivered = {}
    for family in dict.fromkeys(e.family for e in evaluations):
        own_label = own_evaluation(evaluations, family).label
        reference = tables[own_label]
        calibration_rows = reference[calibration_mask(reference)]
        components = combined_components(reference, select)
        atoms = atom_calibration.get(family, {})
        family_tables = {e.label: tables[e.label] for e in evaluations if e.family == family}
        own = {label: (calibration_mask(t) if label == own_label else np.zeros(len(t), dtype=bool))
               for label, t in family_tables.items()}
        for label, table in family_tables.items():
            if components:
                logs = {name: component_log_pvalues(table, name, calibration_rows, own[label], atoms.get(name),
                                                    block_frames) for name in components}
                table[COMBINED_SCORE], table[f"{COMBINED_SCORE}_driver"] = combined_from_log_pvalues(logs)
        calibration_rows = reference[calibration_mask(reference)]  # now with the combined score
        flag_of = {label: _flag_statistic(t, select.score, calibration_rows, own[label], atoms.get(select.score),
                                          block_frames) for label, t in family_tables.items()}
        calibration_flag = flag_of[own_label][calibration_mask(reference)]
        calibration_groups = structure_groups(calibration_rows, block_frames)
        finite = np.isfinite(calibration_flag)
        n_calibration = int(finite.sum())
        n_groups = len(set(calibration_groups[finite].tolist()))
        level = effective_alpha(select.alpha, n_groups)
        for label, table in family_tables.items():
            for score in [c for c in ALL_SCORES if c in table.columns]:
                table[f"{score}_percentile"] = percentile_against(
                    table[score].to_numpy(), calibration_rows[score].to_numpy()
                )
            own_ge, own_n = group_own_counts(flag_of[label], structure_groups(table, block_frames), own[label])
            table[f"{select.score}_pvalue"] = group_pvalue(flag_of[label], calibration_flag, calibration_groups,
                                                           own_ge, own_n)
            table["ood"] = (table[f"{select.score}_pvalue"] <= level + 1e-12).to_numpy()
        delivered[family] = {
            "n_calibration": n_calibration, "n_groups": n_groups, "alpha": select.alpha, "effective_alpha": level,
            "delivered_rate": delivered_rate(select.alpha, n_groups), "components": components,
        }
    return delivered


def calibrate_run(
    tables: dict[str, pd.DataFrame], evaluations: list[EvaluationPlan], score_files: dict[str, str | Path],
    select: SelectConfig, block_frames: int = 10,
) -> dict[str, dict]:
    """:func:`add_percentiles` with each family's calibration atoms read from its training set's
    scores file (``score_files`` by evaluation label): what a run's report and ``evaluate`` share."""
    atom_calibration = {
        e.family: training_atom_calibration(tables[e.label], score_files[e.label], select, block_frames)
        for e in evaluations if e.reference
    }
    delivered = add_percentiles(tables, evaluations, select, atom_calibration, block_frames)
    for e in evaluations:
        if e.reference:
            with xr.open_dataset(score_files[e.label], engine="netcdf4") as ds:
                delivered[e.family]["grouping"] = str(ds.attrs.get("grouping", ""))
    return delivered


def training_atom_calibration(
    training: pd.DataFrame, scores_file: str | Path, select: SelectConfig, block_frames: int = 10,
) -> dict[str, AtomCalibration]:
    """The calibration atoms of a family's training set (``training``: its table) for every
    ``_max`` score that ``select`` ranks or combines by."""
    return read_atom_calibration(scores_file, list(training.loc[calibration_mask(training), "structure_id"]),
                                 sorted({*select.combine, select.score}), block_frames)


def _flag_statistic(table: pd.DataFrame, score: str, calibration_rows: pd.DataFrame, own_rows: np.ndarray,
                    atoms: AtomCalibration | None, block_frames: int) -> np.ndarray:
    """What the flag's conformal p-value is taken of: the score itself, or for a ``_max`` score
    with calibration atoms its size-aware surprise (-log p of the Sidak-adjusted atom p-value)."""
    if atoms is not None and score.endswith("_max"):
        return -component_log_pvalues(table, score, calibration_rows, own_rows, atoms, block_frames)
    return table[score].to_numpy(dtype=float)


def groups_of_scores(scores_file: str | Path, scores: ScoresConfig):
    """:func:`mace_ood.runs.find_groups` of a scores file's structures (its runs, by ``scores.group_by``)."""
    from mace_ood.runs import find_groups

    with xr.open_dataset(scores_file, engine="netcdf4") as ds:
        fields = {name: ds[name].values for name in ("source_file", "frame_index", "n_atoms", "formula", "info_json")
                  if name in ds}
    return find_groups(fields["source_file"].astype(str), fields["frame_index"], scores.group_by,
                       scores.split_block_frames, fields.get("n_atoms"),
                       fields["formula"].astype(str) if "formula" in fields else None,
                       fields["info_json"].astype(str) if "info_json" in fields else None)


def grouping_ids(scores_file: str | Path) -> np.ndarray:
    with xr.open_dataset(scores_file, engine="netcdf4") as ds:
        return ds["structure_id"].values.astype(str)


def alpha_note(family: str, delivered: dict) -> str:
    """One line on what the flag can deliver with this many independent groups (runs), in words."""
    groups, n = delivered.get("n_groups", delivered["n_calibration"]), delivered["n_calibration"]
    alpha, rate = delivered["alpha"], delivered["delivered_rate"]
    if groups == 0:
        return f"{family}: no calibration structures: no structure can be flagged ood"
    counted = f"{n} training structures in {groups} independent group{'s' if groups != 1 else ''} (runs)"
    if delivered["effective_alpha"] > alpha:
        return (f"{family}: {counted} cannot deliver alpha = {alpha:g}: each run counts once, so the smallest p-value "
                f"is 1/{groups + 1} = {1 / (groups + 1):.3f}; ood flags structures above every training run, a "
                f"false-flag rate of at most {rate:.3f} on new in-distribution runs. alpha = {alpha:g} needs "
                f"{math.ceil(1 / alpha) - 1} or more runs: add runs, or name them with scores.group_by")
    return (f"{family}: {counted}, each scored out of fold; ood at alpha = {alpha:g} delivers a false-flag rate of "
            f"at most {rate:.4f} on new in-distribution runs")
