"""The Excel report: a summary sheet, one sheet per evaluation (its selection), a skipped sheet."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from mace_ood.files import atomic_path
from mace_ood.score.compute import ALL_SCORES


def sheet_name(text: str, taken: set[str]) -> str:
    name = re.sub(r"[\[\]:*?/\\]", "_", text)[:31]
    base, n = name, 2
    while name in taken:
        suffix = f"~{n}"
        name, n = base[: 31 - len(suffix)] + suffix, n + 1
    taken.add(name)
    return name


SCORE_FORMAT = "0.00E+00"  # 3 significant digits
PERCENTILE_FORMAT = "0.0"


LOWER_BOUND_FORMAT = '"≥ "0.000'


def column_number_format(column: str) -> str | None:
    """Scores with 3 significant digits, percentiles with 1 decimal; flags stay booleans (TRUE/FALSE)."""
    if column.endswith("_percentile"):
        return PERCENTILE_FORMAT
    if column in ALL_SCORES or column.endswith("_pvalue") or column in (
        "median_score", "max_score", "nearest_training_distance", "alpha", "delivered_rate",
    ):
        return SCORE_FORMAT
    return None


def write_excel(
    path: str | Path,
    summary: pd.DataFrame,
    selected: dict[str, pd.DataFrame],
    skipped: pd.DataFrame,
    score: str = "latent_variance",
) -> Path:
    """Excel report: a summary sheet, one sheet per evaluation (its top K), a skipped sheet."""
    from openpyxl.formatting.rule import ColorScaleRule
    from openpyxl.utils import get_column_letter

    def format_sheet(sheet, frame: pd.DataFrame, score_column: str | None) -> None:
        sheet.freeze_panes = "A2"
        if frame.shape[1]:
            sheet.auto_filter.ref = sheet.dimensions
        for index, column in enumerate(frame.columns, start=1):
            values = [str(column)] + [str(v) for v in frame[column].head(500)]
            sheet.column_dimensions[get_column_letter(index)].width = min(60, max(8, max(map(len, values)) + 2))
        if score_column in frame.columns and len(frame):
            letter = get_column_letter(list(frame.columns).index(score_column) + 1)
            sheet.conditional_formatting.add(
                f"{letter}2:{letter}{len(frame) + 1}",
                ColorScaleRule(start_type="min", start_color="FFF8E1", mid_type="percentile",
                               mid_value=50, mid_color="FFB74D", end_type="max", end_color="D84315"),
            )
        for cell in sheet[1]:
            cell.font = cell.font.copy(bold=True)
        for index, column in enumerate(frame.columns, start=1):
            number_format = column_number_format(str(column))
            if number_format:
                for (cell,) in sheet.iter_rows(min_row=2, min_col=index, max_col=index, max_row=len(frame) + 1):
                    cell.number_format = number_format
        if {"force_rmse_lower", "force_rmse_is_lower_bound"} <= set(frame.columns):
            # beyond the validation range the error is reported from below: shown as ">= 0.140", still a number
            index = list(frame.columns).index("force_rmse_lower") + 1
            floors = frame["force_rmse_is_lower_bound"].fillna(False).astype(bool).to_numpy()
            for row in np.flatnonzero(floors):
                sheet.cell(row=int(row) + 2, column=index).number_format = LOWER_BOUND_FORMAT

    taken: set[str] = set()
    with atomic_path(path) as tmp:
        with pd.ExcelWriter(tmp, engine="openpyxl") as writer:
            name = sheet_name("summary", taken)
            summary.to_excel(writer, sheet_name=name, index=False)
            format_sheet(writer.sheets[name], summary, "max_score")
            for label, frame in selected.items():
                name = sheet_name(label, taken)
                frame.to_excel(writer, sheet_name=name, index=False)
                format_sheet(writer.sheets[name], frame, score)
            name = sheet_name("skipped", taken)
            skipped.to_excel(writer, sheet_name=name, index=False)
            format_sheet(writer.sheets[name], skipped, None)
    return Path(path)
