"""Pictures and interactive views: a latent PCA plot and a chemiscope file per evaluation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from mace_ood.reference import sample_atoms
from mace_ood.report import PER_ATOM_OF, atomic_path, per_atom_scores, structure_atoms
from mace_ood.scores import ALL_SCORES
from mace_ood.structures import read_structures


def seed0_latents(path: str | Path, index: np.ndarray) -> np.ndarray:
    with xr.open_dataset(path, engine="netcdf4") as ds:
        return np.asarray(ds["latent"].isel(atom=index).values, dtype=np.float64)


def pca_basis(sample: np.ndarray, n_components: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Mean and principal axes (columns) of ``sample``."""
    mean = sample.mean(axis=0)
    _, _, vt = np.linalg.svd(sample - mean, full_matrices=False)
    return mean, vt[:n_components].T


def plot_latent_pca(
    latent_file: str | Path,
    reference_file: str | Path,
    scores_file: str | Path,
    score: str,
    path: str | Path,
    title: str,
    max_atoms: int = 5000,
) -> Path:
    """Seed 0's latents of an evaluation on the first two principal axes of the training set,
    coloured by the per-atom score; the training-set atoms in grey beneath."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with xr.open_dataset(reference_file) as ds:
        n_reference = ds.sizes["atom"]
    with xr.open_dataset(scores_file) as ds:
        per_atom = ds[f"atom_{PER_ATOM_OF.get(score, score)}"].values
    reference = seed0_latents(reference_file, sample_atoms(n_reference, max_atoms, 0))
    index = sample_atoms(len(per_atom), max_atoms, 1)
    latents = seed0_latents(latent_file, index)
    mean, axes = pca_basis(reference)
    fig, ax = plt.subplots(figsize=(6, 5))
    ref_xy = (reference - mean) @ axes
    ax.scatter(ref_xy[:, 0], ref_xy[:, 1], s=4, c="lightgrey", label="training set", rasterized=True)
    xy = (latents - mean) @ axes
    order = np.argsort(per_atom[index])
    points = ax.scatter(xy[order, 0], xy[order, 1], s=6, c=per_atom[index][order], cmap="magma_r", rasterized=True)
    fig.colorbar(points, ax=ax, label=f"per-atom {PER_ATOM_OF.get(score, score)}")
    ax.set_xlabel("latent PC1 (training set)")
    ax.set_ylabel("latent PC2 (training set)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(path)


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

    rows = table.nsmallest(max_structures, "rank").reset_index(drop=True)
    structures = read_structures(list(zip(rows["source_file"], rows["frame_index"], strict=True)))
    counts = rows["n_atoms"].to_numpy()
    with xr.open_dataset(scores_file) as ds:
        offsets = pd.Series(ds["atom_offset"].values, index=ds["structure_id"].values.astype(str))
        atom_index = structure_atoms(offsets[rows["structure_id"]].to_numpy(), counts)
        per_atom = per_atom_scores(ds, atom_index)
    order = np.argsort(atom_index, kind="stable")
    with xr.open_dataset(latent_file) as ds:  # only the selected atoms' rows are read
        latents = np.asarray(ds["latent"].isel(atom=atom_index[order]).values, dtype=np.float64)[np.argsort(order)]
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
    settings = {"map": {"x": {"property": "latent PC1"}, "y": {"property": "latent PC2"}, "color": {"property": score}}}
    family, dataset = rows["family"].iloc[0], rows["dataset"].iloc[0]
    with atomic_path(path) as tmp:
        gz = tmp.with_name(tmp.name + ".json.gz")
        chemiscope.write_input(
            str(gz), structures=structures, properties=properties, environments=environments, settings=settings,
            metadata={"name": f"mace-ood: {family} on {dataset}", "description": f"ranked by {score}"},
        )
        gz.replace(tmp)
    return Path(path)
