"""Score tables: one row per structure of an evaluation, and reads of selected atoms' rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from mace_ood.metadata import parse_name
from mace_ood.score.compute import ALL_SCORES

ID_COLUMNS = ["structure_id", "source_file", "frame_index", "n_atoms", "formula"]
PER_ATOM_OF = {"force_deviation_max": "force_deviation", "force_deviation_mean": "force_deviation"}  # else same name


def evaluation_table(
    scores_path: str | Path,
    family: str,
    dataset: str,
    reference: bool,
    score: str = "latent_variance",
    patterns: list[str] | tuple[str, ...] = (),
) -> pd.DataFrame:
    """One row per structure of an evaluation, every score, ranked by ``score`` (1 = most OOD)."""
    with xr.open_dataset(scores_path, engine="netcdf4") as ds:
        frame = pd.DataFrame({
            "structure_id": ds["structure_id"].values.astype(str),
            "source_file": ds["source_file"].values.astype(str),
            "frame_index": ds["frame_index"].values,
            "n_atoms": ds["n_atoms"].values,
            "formula": ds["formula"].values.astype(str),
            "info_json": ds["info_json"].values.astype(str),
            **{name: ds[name].values for name in ALL_SCORES if name in ds},
        })
    if score not in frame.columns:
        raise ValueError(f"{scores_path}: has no score {score!r}")
    frame.insert(0, "family", family)
    frame.insert(1, "dataset", dataset)
    frame.insert(2, "reference", reference)
    frame["rank"] = frame[score].rank(ascending=False, method="first").astype(int)
    metadata = [
        {**json.loads(info), **parse_name(sid, patterns)}
        for sid, info in zip(frame["structure_id"], frame["info_json"], strict=True)
    ]
    frame = frame.drop(columns="info_json")
    meta = pd.DataFrame(metadata, index=frame.index)
    meta = meta[[c for c in meta.columns if c not in frame.columns]]
    frame = pd.concat([frame, meta], axis=1)
    first = ["family", "dataset", "reference", "rank", score, *ID_COLUMNS]
    return frame[first + [c for c in frame.columns if c not in first]].sort_values("rank").reset_index(drop=True)


def order_columns(frame: pd.DataFrame, score: str) -> pd.DataFrame:
    """Report column order: ids, the ranking score, its percentile and flag, other scores, metadata."""
    first = ["family", "dataset", "reference", "rank", score, f"{score}_percentile", "ood", *ID_COLUMNS]
    scores = [c for name in ALL_SCORES if name != score for c in (name, f"{name}_percentile")]
    ordered = [c for c in first + scores if c in frame.columns]
    return frame[ordered + [c for c in frame.columns if c not in ordered]]


def structure_atoms(offsets: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Atom rows of the given structures, concatenated in their order."""
    return np.concatenate([np.arange(a, a + n) for a, n in zip(offsets, counts, strict=True)]).astype(np.int64)


def read_rows(variable: xr.DataArray, atom_index: np.ndarray) -> np.ndarray:
    """Rows ``atom_index`` of an (atom, ...) variable, read from disk for those only, in the given order."""
    order = np.argsort(atom_index, kind="stable")  # netCDF reads want increasing indices
    return np.asarray(variable.isel(atom=atom_index[order]).values, dtype=np.float64)[np.argsort(order)]


def selected_atom_index(ds: xr.Dataset, rows: pd.DataFrame) -> np.ndarray:
    """Atom rows of the structures in ``rows`` (by structure id), concatenated in their order."""
    offsets = pd.Series(ds["atom_offset"].values, index=ds["structure_id"].values.astype(str))
    return structure_atoms(offsets[rows["structure_id"]].to_numpy(), rows["n_atoms"].to_numpy())


def per_atom_scores(ds: xr.Dataset, atom_index: np.ndarray) -> dict[str, np.ndarray]:
    """Every per-atom score (``atom_<score>``) at the given atoms, read from disk for those only."""
    return {
        name.removeprefix("atom_"): read_rows(ds[name], atom_index)
        for name in ds.data_vars
        if name.startswith("atom_") and name != "atom_offset"
    }
