"""Tables, selected structures (CIF + extxyz) and the Excel report.

Every file is written under a temporary name in its folder and renamed when complete.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import ase.io
import numpy as np
import pandas as pd
import xarray as xr

from mace_ood.metadata import parse_name
from mace_ood.structures import read_structures

ID_COLUMNS = ["structure_id", "source_file", "frame_index", "n_atoms", "formula"]
PER_ATOM_OF = {"force_deviation_max": "force_deviation", "force_deviation_mean": "force_deviation"}  # else same name
VACUUM_BOX_A = 10.0
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix + ".partial", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs are for sharing
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def evaluation_label(family: str, dataset: str) -> str:
    return f"{family}__{dataset}"


def write_scores_netcdf(scores: xr.Dataset, path: str | Path) -> Path:
    """Compute the lazy scores once and store them (per atom and per structure)."""
    with atomic_path(path) as tmp:
        scores.to_netcdf(tmp, engine="netcdf4")
    return Path(path)


def evaluation_table(
    scores_path: str | Path,
    family: str,
    dataset: str,
    reference: bool,
    score: str = "latent_variance",
    patterns: list[str] | tuple[str, ...] = (),
) -> pd.DataFrame:
    """One row per structure of an evaluation, every score, ranked by ``score`` (1 = most OOD)."""
    from mace_ood.scores import ALL_SCORES

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
    from mace_ood.scores import ALL_SCORES

    first = ["family", "dataset", "reference", "rank", score, f"{score}_percentile", "ood", *ID_COLUMNS]
    scores = [c for name in ALL_SCORES if name != score for c in (name, f"{name}_percentile")]
    ordered = [c for c in first + scores if c in frame.columns]
    return frame[ordered + [c for c in frame.columns if c not in ordered]]


def structure_atoms(offsets: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Atom rows of the given structures, concatenated in their order."""
    return np.concatenate([np.arange(a, a + n) for a, n in zip(offsets, counts, strict=True)]).astype(np.int64)


def per_atom_scores(ds: xr.Dataset, atom_index: np.ndarray) -> dict[str, np.ndarray]:
    """Every per-atom score (``atom_<score>``) at the given atoms, read from disk for those only."""
    order = np.argsort(atom_index, kind="stable")  # netCDF reads want increasing indices
    back = np.argsort(order)
    return {
        name.removeprefix("atom_"): np.asarray(ds[name].isel(atom=atom_index[order]).values, dtype=float)[back]
        for name in ds.data_vars
        if name.startswith("atom_") and name != "atom_offset"
    }


def safe_name(text: str, limit: int = 80) -> str:
    return re.sub(r"[^A-Za-z0-9._+=-]+", "_", text).strip("_")[:limit] or "structure"


def write_selected(
    table: pd.DataFrame, scores_path: str | Path, out_dir: str | Path, top_k: int, score: str = "latent_variance"
) -> pd.DataFrame:
    """Write the top ``top_k`` rows as CIF and extended XYZ; returns those rows with file paths.

    The extxyz file carries every per-atom score in ``atoms.arrays["MACE_OOD_<score>"]``
    (colour by it in OVITO or the ASE GUI); ``most_uncertain_atom`` is the index of the atom
    with the highest per-atom value of the ranking score. Structures without a cell get a
    box with ``VACUUM_BOX_A`` of vacuum around them for the CIF.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    selected = table.nsmallest(top_k, "rank").copy()
    width = max(2, len(str(top_k)))
    cif_paths, xyz_paths, worst_atoms = [], [], []
    per_atom_name = f"atom_{PER_ATOM_OF.get(score, score)}"
    with xr.open_dataset(scores_path, engine="netcdf4") as ds:
        offsets = pd.Series(ds["atom_offset"].values, index=ds["structure_id"].values.astype(str))
        counts = selected["n_atoms"].to_numpy()
        per_atom = per_atom_scores(ds, structure_atoms(offsets[selected["structure_id"]].to_numpy(), counts))
        bounds = np.concatenate([[0], np.cumsum(counts)])
        structures = read_structures(list(zip(selected["source_file"], selected["frame_index"], strict=True)))
        for i, (row, atoms) in enumerate(zip(selected.itertuples(), structures, strict=True)):
            for name, values in per_atom.items():
                atoms.arrays[f"MACE_OOD_{name}"] = values[bounds[i] : bounds[i + 1]]
            atom_scores = atoms.arrays.get(f"MACE_OOD_{per_atom_name.removeprefix('atom_')}")
            atoms.info[f"MACE_OOD_{score}"] = float(getattr(row, score))
            atoms.info["MACE_OOD_rank"] = int(row.rank)
            stem = f"{int(row.rank):0{width}d}_{safe_name(row.structure_id)}"
            cif_atoms = atoms.copy()
            if not cif_atoms.cell.rank == 3:
                cif_atoms.center(vacuum=VACUUM_BOX_A)
                cif_atoms.pbc = False
            cif_path = out_dir / f"{stem}.cif"
            with atomic_path(cif_path) as tmp:
                ase.io.write(tmp, cif_atoms, format="cif")
            xyz_path = out_dir / f"{stem}.extxyz"
            with atomic_path(xyz_path) as tmp:
                ase.io.write(tmp, atoms, format="extxyz")
            cif_paths.append(str(cif_path))
            xyz_paths.append(str(xyz_path))
            worst_atoms.append(int(np.argmax(atom_scores)) if atom_scores is not None else -1)
    selected["most_uncertain_atom"] = worst_atoms
    selected["cif"] = cif_paths
    selected["extxyz"] = xyz_paths
    return selected


def write_text(text: str, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_csv(frame: pd.DataFrame, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return Path(path)


def sheet_name(text: str, taken: set[str]) -> str:
    name = re.sub(r"[\[\]:*?/\\]", "_", text)[:31]
    base, n = name, 2
    while name in taken:
        suffix = f"~{n}"
        name, n = base[: 31 - len(suffix)] + suffix, n + 1
    taken.add(name)
    return name


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
