"""Does a score find OOD structures? Rank correlation with the true error, and ROC-AUC.

For a finished run directory:

- **error**: when the structures carry reference forces (``REF_forces`` in ``atoms.arrays``,
  or a calculator's forces) and the run stored predicted forces (``forces: true``), each
  structure's force RMSE of the ensemble mean; every score's Spearman rank correlation
  with it.
- **ROC-AUC**: per dataset, the label given in the config's ``ood_labels``, else the natural
  label of the cross-evaluation: a family's own training set is in-distribution (0), every
  other dataset it scores is out of distribution (1).

Both with percentile bootstrap 95 % intervals over structures.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
from scipy.stats import rankdata

from mace_ood.files import pyplot, save_figure
from mace_ood.report.tables import evaluation_table
from mace_ood.score.compute import ALL_SCORES
from mace_ood.structures import read_structures


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    rx, ry = rankdata(x), rankdata(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic (ties count one half)."""
    labels = np.asarray(labels, dtype=bool)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def bootstrap_interval(
    metric, arrays: tuple[np.ndarray, ...], n_resamples: int = 1000, seed: int = 0, strata: np.ndarray | None = None
) -> tuple[float, float]:
    """Percentile 95 % interval of ``metric(*arrays)`` over resampled rows (within strata if given)."""
    rng = np.random.default_rng(seed)
    n = len(arrays[0])
    groups = [np.flatnonzero(strata == value) for value in np.unique(strata)] if strata is not None else [np.arange(n)]
    values = []
    for _ in range(n_resamples):
        index = np.concatenate([rng.choice(g, len(g), replace=True) for g in groups])
        values.append(metric(*(a[index] for a in arrays)))
    values = np.asarray(values)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def reference_forces(atoms, key: str) -> np.ndarray | None:
    if key in atoms.arrays:
        return np.asarray(atoms.arrays[key])
    if atoms.calc is not None and "forces" in getattr(atoms.calc, "results", {}):
        return np.asarray(atoms.calc.results["forces"])
    return None


def force_errors(scores_file: Path, forces_key: str = "REF_forces") -> np.ndarray | None:
    """Per structure, the force RMSE of the ensemble mean against the reference forces."""
    with xr.open_dataset(scores_file) as ds:
        seed_files = json.loads(ds.attrs["seed_files"])
        sources = ds["source_file"].values.astype(str)
        frames = ds["frame_index"].values
        offsets, counts = ds["atom_offset"].values, ds["n_atoms"].values
    predicted = []
    for path in seed_files:
        with xr.open_dataset(path) as latent_file:
            if "forces" not in latent_file:
                return None
            predicted.append(latent_file["forces"].values)
    mean_forces = np.mean(predicted, axis=0)
    errors = np.full(len(sources), np.nan)
    structures = read_structures(list(zip(sources, frames, strict=True)))
    for row, atoms in enumerate(structures):
        truth = reference_forces(atoms, forces_key)
        if truth is not None:
            start = offsets[row]
            diff = mean_forces[start : start + counts[row]] - truth
            errors[row] = float(np.sqrt(np.mean(diff**2)))
    return errors if np.isfinite(errors).any() else None


def evaluate_run(
    run_dir: str | Path, n_resamples: int = 1000, forces_key: str = "REF_forces", seed: int = 0
) -> pd.DataFrame:
    """Per family and score: Spearman with the force error and ROC-AUC, with bootstrap intervals."""
    run_dir = Path(run_dir)
    files = sorted((run_dir / "scores").glob("*.nc"))
    if not files:
        raise FileNotFoundError(f"{run_dir}: no scores/*.nc (is this a finished mace-ood run directory?)")
    tables = []
    for path in files:
        with xr.open_dataset(path) as ds:
            family, dataset, reference = ds.attrs["family"], ds.attrs["dataset"], bool(ds.attrs["reference"])
        table = evaluation_table(path, family, dataset, reference, "latent_variance")
        errors = force_errors(path, forces_key)
        table = table.sort_index()
        table["force_rmse"] = errors if errors is not None else np.nan
        tables.append(table)
    data = pd.concat(tables, ignore_index=True)
    config_file = run_dir / "run_config.json"
    ood_labels = json.loads(config_file.read_text()).get("ood_labels", {}) if config_file.is_file() else {}
    natural = ~data["reference"]
    data["ood_label"] = [ood_labels.get(d, n) for d, n in zip(data["dataset"], natural, strict=True)]
    rows = []
    for family, group in data.groupby("family"):
        labels = group["ood_label"].to_numpy(dtype=bool)
        error = group["force_rmse"].to_numpy()
        has_error = np.isfinite(error)
        for score in [s for s in ALL_SCORES if s in group.columns]:
            values = group[score].to_numpy()
            if has_error.sum() > 2:
                x, y = values[has_error], error[has_error]
                low, high = bootstrap_interval(spearman, (x, y), n_resamples, seed)
                rows.append({"family": family, "score": score, "metric": "spearman_vs_force_rmse",
                             "value": spearman(x, y), "ci_low": low, "ci_high": high, "n": int(has_error.sum())})
            if labels.any() and (~labels).any():
                low, high = bootstrap_interval(roc_auc, (values, labels), n_resamples, seed, strata=labels)
                rows.append({"family": family, "score": score, "metric": "roc_auc_ood_vs_in_distribution",
                             "value": roc_auc(values, labels), "ci_low": low, "ci_high": high, "n": len(values)})
    return pd.DataFrame(rows, columns=["family", "score", "metric", "value", "ci_low", "ci_high", "n"])


def plot_evaluation(table: pd.DataFrame, path: str | Path) -> Path:
    plt = pyplot()
    metrics = list(dict.fromkeys(table["metric"]))
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        part = table[table["metric"] == metric]
        families = list(dict.fromkeys(part["family"]))
        scores = list(dict.fromkeys(part["score"]))
        width = 0.8 / max(1, len(families))
        for i, family in enumerate(families):
            sub = part[part["family"] == family].set_index("score").reindex(scores)
            x = np.arange(len(scores)) + i * width
            err = np.vstack([sub["value"] - sub["ci_low"], sub["ci_high"] - sub["value"]])
            ax.bar(x, sub["value"], width, yerr=np.nan_to_num(err), capsize=2, label=family)
        ax.set_xticks(np.arange(len(scores)) + 0.4 - width / 2, scores, rotation=35, ha="right", fontsize=8)
        ax.axhline(0.5 if "auc" in metric else 0.0, color="k", linewidth=0.8, linestyle="--")
        ax.set_title(metric, fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
