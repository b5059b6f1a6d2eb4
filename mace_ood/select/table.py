"""The select stage's decisions on disk: one CSV table and one JSON summary per evaluation.

The table holds every structure of the evaluation (ids, every score, percentiles, the ranking
score's p-value, ``ood``, ``rank``, ``split`` and the pick fields ``selected``, ``group_size``,
``nearest_training_id``, ``nearest_training_distance``); the report renders it, ``mace-ood
evaluate`` and :func:`mace_ood.open_run` read it. Reading it back gives the numbers written
(floats round-trip exactly).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from mace_ood.files import write_csv, write_text
from mace_ood.paths import RunPaths

TEXT_COLUMNS = ("family", "dataset", "structure_id", "source_file", "formula", "split", "combined_driver",
                "nearest_training_id")
PICK_COLUMNS = ("selected", "group_size", "nearest_training_id", "nearest_training_distance")


class MissingSelection(FileNotFoundError):
    """A run directory whose select stage has not written its decisions."""


def write_selection(table: pd.DataFrame, summary: dict, output_dir: str | Path, label: str) -> tuple[Path, Path]:
    """Write one evaluation's decisions and summary (atomically); returns both paths."""
    table_path = write_csv(table, RunPaths(output_dir).selection(label))
    summary_path = write_text(json.dumps(summary, indent=1, default=float), RunPaths(output_dir).selection_summary(label))
    return table_path, summary_path


def read_selection(output_dir: str | Path, label: str) -> pd.DataFrame:
    """One evaluation's decisions, in rank order, with the dtypes they were written with."""
    path = RunPaths(output_dir).selection(label)
    if not path.is_file():
        raise MissingSelection(f"{path}: missing (the select stage of `mace-ood run` writes it; run the config "
                               "again: latents and scores are reused)")
    header = pd.read_csv(path, nrows=0).columns
    frame = pd.read_csv(
        path, dtype={c: str for c in TEXT_COLUMNS if c in header}, keep_default_na=False, na_values=[""],
        float_precision="round_trip",
    )
    for column in TEXT_COLUMNS:
        if column in frame.columns:
            frame[column] = frame[column].fillna("").astype(str)
    for column in ("reference", "ood"):
        if column in frame.columns:
            frame[column] = frame[column].astype(bool)
    if "selected" in frame.columns:
        frame["selected"] = frame["selected"].astype("Int64")
    return frame


def read_selection_summary(output_dir: str | Path, label: str) -> dict:
    """What the select stage told about one evaluation (its summary row)."""
    path = RunPaths(output_dir).selection_summary(label)
    if not path.is_file():
        raise MissingSelection(f"{path}: missing (the select stage of `mace-ood run` writes it)")
    return json.loads(path.read_text())


def picks(table: pd.DataFrame) -> pd.DataFrame:
    """The selected rows, in pick order."""
    return table[table["selected"].notna()].sort_values("selected")
