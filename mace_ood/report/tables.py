"""Report tables: column order, and reads of the selected structures' atom rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr

from mace_ood.score.compute import ALL_SCORES, COMBINED_SCORE
from mace_ood.score.reference import atom_rows
from mace_ood.score.tables import ID_COLUMNS

COMBINED_PER_ATOM = "mahalanobis"  # the per-atom picture shown for the combined score


def per_atom_name(score: str) -> str:
    """The per-atom score (``atom_<name>`` in the scores file) behind a per-structure score."""
    if score == COMBINED_SCORE:
        return COMBINED_PER_ATOM
    return score.removesuffix("_max").removesuffix("_mean")


def order_columns(frame: pd.DataFrame, score: str) -> pd.DataFrame:
    """Report column order: ids, the ranking score, its p-value, flag and percentile, other scores, metadata."""
    first = ["family", "dataset", "reference", "rank", "selected", score, f"{score}_pvalue", "ood",
             f"{score}_percentile", f"{COMBINED_SCORE}_driver", "predicted_force_rmse", "force_rmse_upper", "force_rmse_lower",
             "force_rmse_is_lower_bound", *ID_COLUMNS]
    scores = [c for name in ALL_SCORES if name != score for c in (name, f"{name}_percentile")]
    ordered = [c for c in first + scores if c in frame.columns]
    return frame[ordered + [c for c in frame.columns if c not in ordered]]


def read_rows(variable: xr.DataArray, atom_index: np.ndarray, gap: int = 4096, max_span: int = 1 << 18) -> np.ndarray:
    """Rows ``atom_index`` of an (atom, ...) variable, in the given order, read as contiguous slices.

    The sorted rows are cut into runs wherever two are more than ``gap`` rows apart (and every
    ``max_span`` rows), and each run is one slice read: a selected structure's atoms are one
    run. netCDF4's point-wise fancy indexing took 20 s for 2,000 structures of 10^5 atoms."""
    atom_index = np.asarray(atom_index, dtype=np.int64)
    if atom_index.size == 0:
        return np.zeros((0, *variable.shape[1:]))
    order = np.argsort(atom_index, kind="stable")
    rows = atom_index[order]
    cuts = np.flatnonzero((np.diff(rows) > gap) | (np.diff((rows - rows[0]) // max_span) != 0)) + 1
    pieces = []
    for run in np.split(rows, cuts):
        block = np.asarray(variable.isel(atom=slice(int(run[0]), int(run[-1]) + 1)).values, dtype=np.float64)
        pieces.append(block[run - run[0]])
    out = np.empty((len(rows), *variable.shape[1:]))
    out[order] = np.concatenate(pieces)
    return out


def selected_atom_index(ds: xr.Dataset, rows: pd.DataFrame) -> np.ndarray:
    """Atom rows of the structures in ``rows`` (by structure id), concatenated in their order."""
    offsets = pd.Series(ds["atom_offset"].values, index=ds["structure_id"].values.astype(str))
    return atom_rows(offsets[rows["structure_id"]].to_numpy(), rows["n_atoms"].to_numpy())


def per_atom_scores(ds: xr.Dataset, atom_index: np.ndarray) -> dict[str, np.ndarray]:
    """Every per-atom score (``atom_<score>``) at the given atoms, read from disk for those only."""
    return {
        name.removeprefix("atom_"): read_rows(ds[name], atom_index)
        for name in ds.data_vars
        if name.startswith("atom_") and name != "atom_offset"
    }
