"""The force error in eV/Angstrom: measured where reference forces exist, predicted elsewhere.

:func:`force_errors` is each structure's force RMSE of the ensemble-mean forces against the
reference forces (streamed frame by frame). :func:`fit_error_model` maps a ranking score to the
expected force RMSE with an isotonic (monotone) regression fitted on one half of a labelled
validation dataset, and bounds it with split conformal prediction on the other half (the halves
split by group of MD frames, as the calibration split is): for a new structure drawn like the
validation data, P(true RMSE <= ``upper``) >= ``level`` (Vovk et al. 2005; Angelopoulos & Bates
2023). Anchors: apax calibrates its uncertainty on a held-out set, ALEBREW with conformal
prediction, DP-GEN's trust levels are in eV/Angstrom.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import ase.io
import numpy as np
import pandas as pd
import xarray as xr

from mace_ood.score.reference import group_unit
from mace_ood.structures import InputError


def reference_forces(atoms, key: str) -> np.ndarray | None:
    if key in atoms.arrays:
        return np.asarray(atoms.arrays[key])
    if atoms.calc is not None and "forces" in getattr(atoms.calc, "results", {}):
        return np.asarray(atoms.calc.results["forces"])
    return None


def force_errors(scores_file: Path, forces_key: str = "REF_forces") -> pd.Series | None:
    """Per structure id, the force RMSE of the ensemble mean against the reference forces.

    Streams: one structure's forces per seed and one frame at a time (each file read once), so
    memory does not grow with the dataset."""
    import netCDF4

    with xr.open_dataset(scores_file) as ds:
        seed_files = json.loads(ds.attrs["seed_files"])
        ids = ds["structure_id"].values.astype(str)
        sources = ds["source_file"].values.astype(str)
        frames = ds["frame_index"].values
        offsets, counts = ds["atom_offset"].values, ds["n_atoms"].values
    seeds = [netCDF4.Dataset(path) for path in seed_files]
    try:
        if any("forces" not in seed.variables for seed in seeds):
            return None
        for seed in seeds:
            seed.set_auto_mask(False)
        errors = np.full(len(sources), np.nan)
        for source in dict.fromkeys(sources):
            rows = np.flatnonzero(sources == source)
            row_of_frame = dict(zip(frames[rows].astype(int), rows, strict=True))
            last, read = max(row_of_frame), -1
            for read, atoms in enumerate(ase.io.iread(source, index=f":{last + 1}", do_not_split_by_at_sign=True)):
                row = row_of_frame.get(read)
                truth = reference_forces(atoms, forces_key) if row is not None else None
                if truth is None:
                    continue
                start, stop = int(offsets[row]), int(offsets[row] + counts[row])
                mean_forces = np.mean([seed.variables["forces"][start:stop] for seed in seeds], axis=0)
                errors[row] = float(np.sqrt(np.mean((mean_forces - truth) ** 2)))
            if read < last:
                raise InputError(f"{source}: frame {last} not found (has the file changed since the run?)")
    finally:
        for seed in seeds:
            seed.close()
    return pd.Series(errors, index=ids, name="force_rmse") if np.isfinite(errors).any() else None


@dataclass
class ErrorModel:
    """Ranking score -> expected force RMSE (isotonic, non-decreasing), and the conformal margin of
    the upper bound, fitted on a validation dataset."""

    score: str
    thresholds_x: np.ndarray
    thresholds_y: np.ndarray
    margin: float  # upper = predicted + margin
    level: float
    n_fit: int
    n_calibration: int

    def predict(self, values: np.ndarray) -> np.ndarray:
        """Expected force RMSE (eV/Angstrom) at each score (clipped to the fitted range; NaN for NaN)."""
        values = np.asarray(values, dtype=float)
        out = np.interp(values, self.thresholds_x, self.thresholds_y)
        return np.where(np.isnan(values), np.nan, out)

    def upper(self, values: np.ndarray) -> np.ndarray:
        return self.predict(values) + self.margin

    def as_dict(self) -> dict:
        return {"score": self.score, "thresholds_x": self.thresholds_x.tolist(),
                "thresholds_y": self.thresholds_y.tolist(), "margin": self.margin, "level": self.level,
                "n_fit": self.n_fit, "n_calibration": self.n_calibration}

    @classmethod
    def from_dict(cls, data: dict) -> ErrorModel:
        return cls(data["score"], np.asarray(data["thresholds_x"], dtype=float),
                   np.asarray(data["thresholds_y"], dtype=float), float(data["margin"]), float(data["level"]),
                   int(data["n_fit"]), int(data["n_calibration"]))


def conformal_margin(residuals: np.ndarray, level: float) -> float:
    """The ceil(level (m + 1))-th smallest of m calibration residuals (true - predicted): the split
    conformal margin; infinite when m is too small for ``level``."""
    residuals = np.sort(np.asarray(residuals, dtype=float))
    m = residuals.size
    rank = math.ceil(level * (m + 1))
    return float(residuals[rank - 1]) if rank <= m else math.inf


def split_halves(groups: np.ndarray, seed: int = 0) -> np.ndarray:
    """True for the rows whose group (a hash of its name, as the calibration split) fits the map;
    False for the calibration half. Both halves get a group when there are two or more; with one
    group, alternate rows (the margin is then optimistic: neighbouring frames are correlated)."""
    groups = np.asarray(groups, dtype=object)
    names = list(dict.fromkeys(groups.tolist()))
    if len(names) < 2:
        return np.arange(len(groups)) % 2 == 0
    unit = {g: group_unit((str(g), 0), seed) for g in names}
    fit_groups = {g for g in names if unit[g] < 0.5}
    if len(fit_groups) in (0, len(names)):
        fit_groups = set(sorted(names, key=unit.__getitem__)[: len(names) // 2])
    return np.array([g in fit_groups for g in groups], dtype=bool)


def fit_error_model(
    scores: np.ndarray, errors: np.ndarray, fit: np.ndarray, score: str, level: float = 0.9,
) -> ErrorModel:
    """Isotonic map from ``scores`` to ``errors`` on the rows ``fit``, conformal margin on the others
    (rows with a NaN score or error are left out of both)."""
    from sklearn.isotonic import IsotonicRegression

    scores, errors, fit = np.asarray(scores, dtype=float), np.asarray(errors, dtype=float), np.asarray(fit, bool)
    known = np.isfinite(scores) & np.isfinite(errors)
    fit, held = fit & known, ~fit & known
    if fit.sum() < 2 or held.sum() < 1:
        raise ValueError(f"a predicted force error needs labelled structures on both halves, got {int(fit.sum())} "
                         f"to fit and {int(held.sum())} to calibrate")
    iso = IsotonicRegression(increasing=True, out_of_bounds="clip").fit(scores[fit], errors[fit])
    model = ErrorModel(score, np.asarray(iso.X_thresholds_, dtype=float), np.asarray(iso.y_thresholds_, dtype=float),
                       0.0, level, int(fit.sum()), int(held.sum()))
    # a negative margin (the map over-predicts the calibration half) would put the bound under the
    # prediction; clipping at 0 only widens the bound, so coverage still holds
    model.margin = max(0.0, conformal_margin(errors[held] - model.predict(scores[held]), level))
    return model
