"""The selected structures as files: CIF for DFT set-up, extxyz with every per-atom score."""

from __future__ import annotations

import re
from pathlib import Path

import ase.io
import numpy as np
import pandas as pd
import xarray as xr

from mace_ood.files import atomic_path
from mace_ood.report.tables import per_atom_name, per_atom_scores, selected_atom_index
from mace_ood.structures import read_structures

VACUUM_BOX_A = 10.0


def safe_name(text: str, limit: int = 80) -> str:
    return re.sub(r"[^A-Za-z0-9._+=-]+", "_", text).strip("_")[:limit] or "structure"


def pick_tags(row: dict, score: str) -> dict:
    """What a selected structure's files record about the pick (present fields only)."""
    tags = {score: float(row[score]), "rank": int(row["rank"])}
    for name in ("selected", "group_size"):
        if name in row and pd.notna(row[name]):
            tags[name] = int(row[name])
    for name in ("predicted_force_rmse", "force_rmse_upper", "force_rmse_lower"):
        if name in row and pd.notna(row[name]):
            tags[name] = float(row[name])
    if "force_rmse_is_lower_bound" in row and pd.notna(row["force_rmse_is_lower_bound"]):
        tags["force_rmse_is_lower_bound"] = bool(row["force_rmse_is_lower_bound"])
    if row.get("nearest_training_id"):
        tags["nearest_training_id"] = str(row["nearest_training_id"])
        tags["nearest_training_distance"] = float(row["nearest_training_distance"])
    return tags


def add_cif_tags(path: Path, tags: dict) -> None:
    """Add ``_mace_ood_<name>`` data items after the CIF's ``data_`` line (read back by
    ``ase.io.read(..., store_tags=True)``)."""
    lines = path.read_text().splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.startswith("data_")) + 1
    items = [f"_mace_ood_{name} {value!r}\n" if isinstance(value, str) else f"_mace_ood_{name} {value}\n"
             for name, value in tags.items()]
    path.write_text("".join(lines[:at] + ["\n", *items] + lines[at:]))


def write_selected(
    selected: pd.DataFrame, scores_path: str | Path, out_dir: str | Path, score: str = "latent_variance"
) -> pd.DataFrame:
    """Write the selected rows, in their order, as CIF and extended XYZ; returns them with file paths.

    The extxyz file carries every per-atom score in ``atoms.arrays["MACE_OOD_<score>"]``
    (colour by it in OVITO or the ASE GUI); ``most_uncertain_atom`` is the index of the atom
    with the highest per-atom value of the ranking score. Structures without a cell get a
    box with ``VACUUM_BOX_A`` of vacuum around them for the CIF. Picks of an earlier run that
    are not picked now are removed from ``out_dir``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    selected = selected.copy()
    width = max(2, len(str(len(selected))))
    cif_paths, xyz_paths, worst_atoms = [], [], []
    ranking_atom_score = f"MACE_OOD_{per_atom_name(score)}"
    with xr.open_dataset(scores_path, engine="netcdf4") as ds:
        counts = selected["n_atoms"].to_numpy()
        per_atom = per_atom_scores(ds, selected_atom_index(ds, selected))
        bounds = np.concatenate([[0], np.cumsum(counts)])
        structures = read_structures(list(zip(selected["source_file"], selected["frame_index"], strict=True)))
        for i, (row, atoms) in enumerate(zip(selected.itertuples(), structures, strict=True)):
            for name, values in per_atom.items():
                atoms.arrays[f"MACE_OOD_{name}"] = values[bounds[i] : bounds[i + 1]]
            atom_scores = atoms.arrays.get(ranking_atom_score)
            tags = pick_tags(row._asdict(), score)
            atoms.info.update({f"MACE_OOD_{name}": value for name, value in tags.items()})
            order = int(tags.get("selected", row.rank))
            stem = f"{order:0{width}d}_{safe_name(row.structure_id)}"
            cif_atoms = atoms.copy()
            if not cif_atoms.cell.rank == 3:
                cif_atoms.center(vacuum=VACUUM_BOX_A)
                cif_atoms.pbc = False
            cif_path = out_dir / f"{stem}.cif"
            with atomic_path(cif_path) as tmp:
                ase.io.write(tmp, cif_atoms, format="cif")
                add_cif_tags(tmp, tags)
            xyz_path = out_dir / f"{stem}.extxyz"
            with atomic_path(xyz_path) as tmp:
                ase.io.write(tmp, atoms, format="extxyz")
            cif_paths.append(str(cif_path))
            xyz_paths.append(str(xyz_path))
            worst_atoms.append(int(np.argmax(atom_scores)) if atom_scores is not None else -1)
    written = set(cif_paths) | set(xyz_paths)
    for stale in [*out_dir.glob("*.cif"), *out_dir.glob("*.extxyz")]:
        if str(stale) not in written:  # an earlier run's pick that is not picked now
            stale.unlink()
    selected["most_uncertain_atom"] = worst_atoms
    selected["cif"] = cif_paths
    selected["extxyz"] = xyz_paths
    return selected
