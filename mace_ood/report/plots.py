"""Pictures of a run: score histograms against the training set, latent PCA maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from mace_ood.files import pyplot, save_figure
from mace_ood.report.tables import per_atom_name
from mace_ood.runtime import hdf5_in_this_thread
from mace_ood.score.reference import sample_atoms


def seed0_latents(path: str | Path, index: np.ndarray) -> np.ndarray:
    with xr.open_dataset(path, engine="netcdf4") as ds:
        return np.asarray(ds["latent"].isel(atom=index).values, dtype=np.float64)


def pca_basis(sample: np.ndarray, n_components: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Mean and principal axes (columns) of ``sample``."""
    mean = sample.mean(axis=0)
    _, _, vt = np.linalg.svd(sample - mean, full_matrices=False)
    return mean, vt[:n_components].T


@hdf5_in_this_thread()
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
    plt = pyplot()
    with xr.open_dataset(reference_file) as ds:
        n_reference = ds.sizes["atom"]
    with xr.open_dataset(scores_file) as ds:
        per_atom = ds[f"atom_{per_atom_name(score)}"].values
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
    fig.colorbar(points, ax=ax, label=f"per-atom {per_atom_name(score)}")
    ax.set_xlabel("latent PC1 (training set)")
    ax.set_ylabel("latent PC2 (training set)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_score_histograms(
    tables: list[pd.DataFrame], references: list[pd.DataFrame], thresholds: list[float], score: str, alpha: float,
    path: Path,
) -> str | None:
    """Per evaluation: the score histogram, its family's calibration-set histogram and ``thresholds``,
    the score the conformal flag at ``alpha`` needs to exceed (the select stage's ``threshold``; for a
    size-aware ``_max`` flag it depends on the size: then it is the threshold among calibration
    structures)."""
    if not tables:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(len(tables), 1, figsize=(7, 2.4 * len(tables)), squeeze=False)
    for ax, table, reference, threshold in zip(axes[:, 0], tables, references, thresholds, strict=True):
        values = table[score].to_numpy()
        ref_values = reference[score].to_numpy()
        both = np.concatenate([values, ref_values])
        both = both[np.isfinite(both)]
        if both.size == 0:
            continue
        bins = np.linspace(both.min(), both.max(), 40) if both.min() != both.max() else 10
        family, dataset = table["family"].iloc[0], table["dataset"].iloc[0]
        ax.hist(ref_values, bins=bins, alpha=0.45, label=f"{family} calibration structures", color="tab:grey")
        if not table["reference"].iloc[0]:
            ax.hist(values, bins=bins, alpha=0.6, label=f"{dataset}", color="tab:red")
        ax.axvline(threshold, color="k", linestyle="--", linewidth=1, label=f"ood threshold (alpha {alpha:g})")
        ax.set_title(f"{family} on {dataset}", fontsize=9)
        ax.set_ylabel("structures")
        ax.legend(fontsize=7)
    axes[-1, 0].set_xlabel(score)
    fig.tight_layout()
    return str(save_figure(fig, path))
