"""Score tables: one row per structure of an evaluation, read from its scores file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from mace_ood.metadata import parse_name
from mace_ood.score.compute import ALL_SCORES

ID_COLUMNS = ["structure_id", "source_file", "frame_index", "n_atoms", "formula"]


def evaluation_table(
    scores_path: str | Path,
    family: str,
    dataset: str,
    reference: bool,
    score: str | None = "latent_variance",
    patterns: list[str] | tuple[str, ...] = (),
    metadata: bool = True,
) -> pd.DataFrame:
    """One row per structure of an evaluation, every score; ranked by ``score`` (1 = most OOD),
    or in file order when ``score`` is None. ``metadata``: add the fields of ``atoms.info`` and
    of the file name (:func:`metadata_table`)."""
    with xr.open_dataset(scores_path, engine="netcdf4") as ds:
        frame = table_from_scores(ds, family, dataset, reference, patterns, metadata)
    if score is not None and score not in frame.columns:
        raise ValueError(f"{scores_path}: has no score {score!r}")
    return rank_table(frame, score) if score is not None else frame


def table_from_scores(
    ds: xr.Dataset, family: str, dataset: str, reference: bool, patterns: list[str] | tuple[str, ...] = (),
    metadata: bool = True,
) -> pd.DataFrame:
    """One row per structure of a scores Dataset (a file's or one computed in memory), in its order."""
    frame = pd.DataFrame({
        "structure_id": ds["structure_id"].values.astype(str),
        "source_file": ds["source_file"].values.astype(str),
        "frame_index": ds["frame_index"].values,
        "n_atoms": ds["n_atoms"].values,
        "formula": ds["formula"].values.astype(str),
        **{name: ds[name].values for name in ALL_SCORES if name in ds},
    })
    if "split" in ds:
        frame["split"] = ds["split"].values.astype(str)
    if "group" in ds:  # the training set's runs and folds (mace_ood.runs): what calibration counts once
        frame["group"] = ds["group"].values.astype(str)
        frame["fold"] = ds["fold"].values
    frame.insert(0, "family", family)
    frame.insert(1, "dataset", dataset)
    frame.insert(2, "reference", reference)
    if not metadata:
        return frame
    meta = metadata_table(ds, patterns).drop(columns="structure_id")
    meta.index = frame.index
    return pd.concat([frame, meta[[c for c in meta.columns if c not in frame.columns]]], axis=1)


def metadata_table(ds: xr.Dataset, patterns: list[str] | tuple[str, ...] = ()) -> pd.DataFrame:
    """Per structure of a scores Dataset: ``structure_id`` and the fields of its ``atoms.info``
    and of its name (temperature, stoichiometry, relaxation kind, ``patterns``)."""
    ids = ds["structure_id"].values.astype(str)
    rows = [{**json.loads(info), **parse_name(sid, patterns)}
            for sid, info in zip(ids, ds["info_json"].values.astype(str), strict=True)]
    meta = pd.DataFrame(rows, index=pd.RangeIndex(len(ids)))
    meta = meta[[c for c in meta.columns if c != "structure_id"]]
    meta.insert(0, "structure_id", ids)
    return meta


def rank_table(frame: pd.DataFrame, score: str) -> pd.DataFrame:
    """``rank`` by ``score`` (1 = highest, NaN last; ties by ``structure_id``, so the rank does not
    depend on the order the structures came in), rows sorted by it."""
    frame = frame.copy()
    values = frame[score].to_numpy(dtype=float)
    order = np.lexsort((frame["structure_id"].astype(str).to_numpy(), -np.nan_to_num(values, nan=-np.inf)))
    rank = np.empty(len(frame), dtype=int)
    rank[order] = np.arange(1, len(frame) + 1)
    frame["rank"] = rank
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
