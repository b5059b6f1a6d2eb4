"""A chemiscope viewer file per evaluation: latent map <-> structures, every score."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from mace_ood.files import atomic_path
from mace_ood.report.plots import pca_basis
from mace_ood.report.tables import per_atom_scores, read_rows, selected_atom_index
from mace_ood.runtime import hdf5_in_this_thread
from mace_ood.score.compute import ALL_SCORES
from mace_ood.select.top import select_top
from mace_ood.structures import read_structures


@hdf5_in_this_thread()
def write_chemiscope(
    table: pd.DataFrame,
    scores_file: str | Path,
    latent_file: str | Path,
    path: str | Path,
    score: str,
    max_structures: int = 2000,
) -> Path:
    """A chemiscope viewer file: the structures (the top ``max_structures`` by ``score``),
    every score as a structure property and per-atom scores as atom properties, and the
    structures' mean latent vectors (seed 0) projected on two principal axes as the map."""
    import chemiscope

    rows = select_top(table, max_structures).reset_index(drop=True)
    structures = read_structures(list(zip(rows["source_file"], rows["frame_index"], strict=True)))
    counts = rows["n_atoms"].to_numpy()
    with xr.open_dataset(scores_file) as ds:
        atom_index = selected_atom_index(ds, rows)
        per_atom = per_atom_scores(ds, atom_index)
    with xr.open_dataset(latent_file) as ds:  # only the selected atoms' rows are read
        latents = read_rows(ds["latent"], atom_index)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    mean_latent = np.stack([latents[a:b].mean(axis=0) for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
    center, axes = pca_basis(mean_latent)
    projection = (mean_latent - center) @ axes if len(rows) > 1 else np.zeros((len(rows), 2))
    properties = {
        "latent PC1": {"target": "structure", "values": projection[:, 0]},
        "latent PC2": {"target": "structure", "values": projection[:, 1]},
        "rank": {"target": "structure", "values": rows["rank"].to_numpy()},
    }
    for name in ALL_SCORES:
        if name in rows:
            properties[name] = {"target": "structure", "values": rows[name].to_numpy(dtype=float)}
        if f"{name}_percentile" in rows:
            properties[f"{name} percentile"] = {"target": "structure", "values": rows[f"{name}_percentile"].to_numpy(dtype=float)}
    for name, values in per_atom.items():
        properties[f"atom {name}"] = {"target": "atom", "values": values}
    environments = [(i, j, 3.5) for i, n in enumerate(counts) for j in range(int(n))]
    # the file also has per-atom environments, so the viewer would target atoms unless told:
    # the map's axes are structure properties
    settings = {
        "target": "structure",
        "map": {"x": {"property": "latent PC1"}, "y": {"property": "latent PC2"}, "color": {"property": score}},
    }
    family, dataset = rows["family"].iloc[0], rows["dataset"].iloc[0]
    with atomic_path(path) as tmp:
        gz = tmp.with_name(tmp.name + ".json.gz")
        chemiscope.write_input(
            str(gz), structures=structures, properties=properties, environments=environments, settings=settings,
            metadata={"name": f"mace-ood: {family} on {dataset}", "description": f"ranked by {score}"},
        )
        gz.replace(tmp)
    return Path(path)
