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
             f"{score}_percentile", f"{COMBINED_SCORE}_driver", *ID_COLUMNS]
    scores = [c for name in ALL_SCORES if name != score for c in (name, f"{name}_percentile")]
    ordered = [c for c in first + scores if c in frame.columns]
    return frame[ordered + [c for c in frame.columns if c not in ordered]]


def read_rows(variable: xr.DataArray, atom_index: np.ndarray) -> np.ndarray:
    """Rows ``atom_index`` of an (atom, ...) variable, read from disk for those only, in the given order."""
    order = np.argsort(atom_index, kind="stable")  # netCDF reads want increasing indices
    return np.asarray(variable.isel(atom=atom_index[order]).values, dtype=np.float64)[np.argsort(order)]


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
