"""Score tables: one row per structure of an evaluation, and reads of selected atoms' rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from mace_ood.metadata import parse_name
from mace_ood.score.compute import ALL_SCORES, COMBINED_SCORE

ID_COLUMNS = ["structure_id", "source_file", "frame_index", "n_atoms", "formula"]
COMBINED_PER_ATOM = "mahalanobis"  # the per-atom picture shown for the combined score


def per_atom_name(score: str) -> str:
    """The per-atom score (``atom_<name>`` in the scores file) behind a per-structure score."""
    if score == COMBINED_SCORE:
        return COMBINED_PER_ATOM
    return score.removesuffix("_max").removesuffix("_mean")


def evaluation_table(
    scores_path: str | Path,
    family: str,
    dataset: str,
    reference: bool,
    score: str | None = "latent_variance",
    patterns: list[str] | tuple[str, ...] = (),
) -> pd.DataFrame:
    """One row per structure of an evaluation, every score; ranked by ``score`` (1 = most OOD),
    or in file order when ``score`` is None."""
    with xr.open_dataset(scores_path, engine="netcdf4") as ds:
        frame = table_from_scores(ds, family, dataset, reference, patterns)
    if score is not None and score not in frame.columns:
        raise ValueError(f"{scores_path}: has no score {score!r}")
    return rank_table(frame, score) if score is not None else frame


def table_from_scores(
    ds: xr.Dataset, family: str, dataset: str, reference: bool, patterns: list[str] | tuple[str, ...] = (),
) -> pd.DataFrame:
    """One row per structure of a scores Dataset (a file's or one computed in memory), in its order."""
    frame = pd.DataFrame({
        "structure_id": ds["structure_id"].values.astype(str),
        "source_file": ds["source_file"].values.astype(str),
        "frame_index": ds["frame_index"].values,
        "n_atoms": ds["n_atoms"].values,
        "formula": ds["formula"].values.astype(str),
        "info_json": ds["info_json"].values.astype(str),
        **{name: ds[name].values for name in ALL_SCORES if name in ds},
    })
    if "split" in ds:
        frame["split"] = ds["split"].values.astype(str)
    frame.insert(0, "family", family)
    frame.insert(1, "dataset", dataset)
    frame.insert(2, "reference", reference)
    metadata = [
        {**json.loads(info), **parse_name(sid, patterns)}
        for sid, info in zip(frame["structure_id"], frame["info_json"], strict=True)
    ]
    frame = frame.drop(columns="info_json")
    meta = pd.DataFrame(metadata, index=frame.index)
    meta = meta[[c for c in meta.columns if c not in frame.columns]]
    return pd.concat([frame, meta], axis=1)


def rank_table(frame: pd.DataFrame, score: str) -> pd.DataFrame:
    """``rank`` by ``score`` (1 = highest, NaN last), rows sorted by it."""
    frame = frame.copy()
    frame["rank"] = frame[score].rank(ascending=False, method="first", na_option="bottom").astype(int)
    first = ["family", "dataset", "reference", "rank", score, *ID_COLUMNS]
    return frame[first + [c for c in frame.columns if c not in first]].sort_values("rank").reset_index(drop=True)


def read_descriptors(scores_path: str | Path, structure_ids: pd.Series | None = None) -> np.ndarray | None:
    """The structures' ``descriptor`` rows (float32), in the order of ``structure_ids`` (default: file order)."""
    with xr.open_dataset(scores_path, engine="netcdf4") as ds:
        if "descriptor" not in ds:
            return None
        values = np.asarray(ds["descriptor"].values, dtype=np.float32)
        ids = ds["structure_id"].values.astype(str)
    if structure_ids is None:
        return values
    return values[pd.Index(ids).get_indexer(structure_ids)]


def order_columns(frame: pd.DataFrame, score: str) -> pd.DataFrame:
    """Report column order: ids, the ranking score, its p-value, flag and percentile, other scores, metadata."""
    first = ["family", "dataset", "reference", "rank", "selected", score, f"{score}_pvalue", "ood",
             f"{score}_percentile", f"{COMBINED_SCORE}_driver", *ID_COLUMNS]
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
