"""The selected structures as files: CIF for DFT set-up, extxyz with every per-atom score."""

from __future__ import annotations

import re
from pathlib import Path

import ase.io
import numpy as np
import pandas as pd
import xarray as xr

from mace_ood.files import atomic_path
from mace_ood.report.tables import PER_ATOM_OF, per_atom_scores, selected_atom_index
from mace_ood.structures import read_structures

VACUUM_BOX_A = 10.0


def safe_name(text: str, limit: int = 80) -> str:
    return re.sub(r"[^A-Za-z0-9._+=-]+", "_", text).strip("_")[:limit] or "structure"


def write_selected(
    selected: pd.DataFrame, scores_path: str | Path, out_dir: str | Path, score: str = "latent_variance"
) -> pd.DataFrame:
    """Write the selected rows, in their order, as CIF and extended XYZ; returns them with file paths.

    The extxyz file carries every per-atom score in ``atoms.arrays["MACE_OOD_<score>"]``
    (colour by it in OVITO or the ASE GUI); ``most_uncertain_atom`` is the index of the atom
    with the highest per-atom value of the ranking score. Structures without a cell get a
    box with ``VACUUM_BOX_A`` of vacuum around them for the CIF.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    selected = selected.copy()
    width = max(2, len(str(len(selected))))
    cif_paths, xyz_paths, worst_atoms = [], [], []
    per_atom_name = f"atom_{PER_ATOM_OF.get(score, score)}"
    with xr.open_dataset(scores_path, engine="netcdf4") as ds:
        counts = selected["n_atoms"].to_numpy()
        per_atom = per_atom_scores(ds, selected_atom_index(ds, selected))
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
