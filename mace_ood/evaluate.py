"""Does a score find OOD structures? Rank correlation with the true error, and ROC-AUC.

For a finished run directory:

- **error**: when the structures carry reference forces (``REF_forces`` in ``atoms.arrays``,
  or a calculator's forces) and the run stored predicted forces (``forces: true``), each
  structure's force RMSE of the ensemble mean; every score's Spearman rank correlation
  with it.
- **ROC-AUC**: OOD structures against in-distribution ones. A structure's label comes from
  ``--labels FILE.csv`` (``structure_id,is_ood``), else the config's ``ood_labels`` for its
  dataset, else the natural label of the cross-evaluation: a family's own training set is in
  distribution, every other dataset it scores is out of distribution. Of the training set,
  only the held-out calibration part counts: the part the reference was fitted on, and the gap
  frames beside it, are left out.

Per (family, dataset) and pooled per family (``dataset`` = ``all``), with percentile
bootstrap 95 % intervals that resample whole groups (source file and frame block, as the
split groups them): frames of one MD run are not independent observations.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import rankdata, spearmanr

from mace_ood.files import pyplot, save_figure
from mace_ood.paths import RunPaths
from mace_ood.runtime import hdf5_in_this_thread
from mace_ood.score.compute import ALL_SCORES
from mace_ood.score.errors import force_errors

EVALUATION_COLUMNS = ["family", "dataset", "score", "metric", "value", "ci_low", "ci_high", "n"]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation (scipy; average ranks for ties), NaN for a constant input."""
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic (ties count one half).

    Equal to scikit-learn's ``roc_auc_score`` (a test checks it), which takes 1.1 ms a call here
    against 0.04 ms for this, and the bootstrap calls it a thousand times per score."""
    labels = np.asarray(labels, dtype=bool)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def bootstrap_interval(
    metric, arrays: tuple[np.ndarray, ...], n_resamples: int = 1000, seed: int = 0, strata: np.ndarray | None = None,
    groups: np.ndarray | None = None,
) -> tuple[float, float]:
    """Percentile 95 % interval of ``metric(*arrays)`` over resamples (within strata if given).

    With ``groups``, whole groups are resampled (a cluster bootstrap): MD frames of one run are
    correlated, and resampling them one by one would treat 10 near-copies as 10 observations and
    give too narrow an interval."""
    rng = np.random.default_rng(seed)
    n = len(arrays[0])
    strata = np.zeros(n, dtype=int) if strata is None else np.asarray(strata)
    groups = np.arange(n) if groups is None else np.asarray(groups)
    units = []  # per stratum: the row indices of each of its groups
    for value in np.unique(strata):
        rows = np.flatnonzero(strata == value)
        _, which = np.unique(groups[rows], return_inverse=True)
        units.append([rows[which == g] for g in range(which.max() + 1)])
    values = []
    for _ in range(n_resamples):
        index = np.concatenate([
            np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))]) for members in units
        ])
        values.append(metric(*(a[index] for a in arrays)))
    values = np.asarray(values)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def read_labels(path: str | Path) -> dict[str, bool]:
    """``structure_id,is_ood`` rows (is_ood: true/false/1/0) from a CSV file."""
    frame = pd.read_csv(path, dtype={"structure_id": str})
    missing = {"structure_id", "is_ood"} - set(frame.columns)
    if missing:
        raise ValueError(f"{path}: needs the columns structure_id,is_ood (missing {', '.join(sorted(missing))})")
    values = frame["is_ood"].astype(str).str.strip().str.lower()
    bad = ~values.isin(["true", "false", "1", "0"])
    if bad.any():
        raise ValueError(f"{path}: is_ood must be true/false/1/0, got {frame['is_ood'][bad].iloc[0]!r}")
    duplicated = frame["structure_id"][frame["structure_id"].duplicated()]
    if len(duplicated):
        raise ValueError(f"{path}: structure_id {duplicated.iloc[0]!r} is labelled more than once "
                         f"({duplicated.nunique()} duplicated ids)")
    return dict(zip(frame["structure_id"], values.isin(["true", "1"]), strict=True))


@hdf5_in_this_thread()
def evaluation_data(
    run_dir: str | Path, forces_key: str = "REF_forces", labels: dict[str, bool] | None = None
) -> pd.DataFrame:
    """Every structure of every evaluation of a run, with all scores, p-values and flags as the
    run's select stage wrote them (``selection/<label>.csv``), its ``force_rmse`` joined by
    structure id, its ``ood_label`` and ``split``. Rows of the training structures the reference was fitted on are
    dropped: they may only be compared with data the fit has not seen."""
    from mace_ood.config import RunConfig, ScoresConfig, SelectConfig
    from mace_ood.score.calibrate import structure_groups
    from mace_ood.select.table import read_selection

    run_dir = Path(run_dir)
    paths = RunPaths(run_dir)
    files = sorted(paths.scores_dir.glob("*.nc"))
    if not files:
        raise FileNotFoundError(f"{run_dir}: no scores/*.nc (is this a finished mace-ood run directory?)")
    config_file = paths.manifest
    config = RunConfig.model_validate_json(config_file.read_text()) if config_file.is_file() else None
    select = config.select if config else SelectConfig()
    tables = {}
    for path in files:  # the select stage's decisions: p-values, flags and the combined score as the run had them
        table = read_selection(run_dir, path.stem)
        errors = force_errors(path, forces_key)
        table["force_rmse"] = table["structure_id"].map(errors) if errors is not None else np.nan
        tables[path.stem] = table
    block_frames = (config.scores if config else ScoresConfig()).split_block_frames
    data = pd.concat(tables.values(), ignore_index=True)
    if "split" not in data.columns:
        data["split"] = ""
    data["split"] = data["split"].fillna("")
    # fit rows were seen by the reference; gap rows are MD neighbours of fit rows
    seen_ids = set(data["structure_id"][data["split"].isin(["fit", "gap"])])
    data = data[~data["split"].isin(["fit", "gap"])].reset_index(drop=True)
    ood_labels = config.ood_labels if config else {}
    natural = [ood_labels.get(d, not r) for d, r in zip(data["dataset"], data["reference"], strict=True)]
    labels = labels or {}
    unknown = sorted(set(labels) - set(data["structure_id"]) - seen_ids)
    if unknown:
        raise ValueError(f"labels: {len(unknown)} structure id(s) are in no evaluation of {run_dir}, "
                         f"e.g. {unknown[0]!r}")
    data["ood_label"] = [labels.get(sid, n) for sid, n in zip(data["structure_id"], natural, strict=True)]
    data["bootstrap_group"] = structure_groups(data, block_frames)
    data.attrs["alpha"] = select.alpha
    data.attrs["error_level"] = select.error_level
    if labels:
        matched = set(labels) & set(data["structure_id"])
        ood = sum(labels[i] for i in matched)
        data.attrs["labels_note"] = (
            f"labels: {len(matched)} of {len(labels)} structure ids matched ({ood} ood, {len(matched) - ood} in "
            f"distribution)" + (f"; {len(set(labels) - matched)} are training structures the reference was fitted "
                                "on (or their MD neighbours) and are left out" if len(matched) < len(labels) else "")
        )
    return data


def _scores_of(group: pd.DataFrame) -> list[str]:
    return [s for s in ALL_SCORES if s in group.columns and np.isfinite(group[s].to_numpy(dtype=float)).any()]


def _spearman_rows(family: str, dataset: str, part: pd.DataFrame, n_resamples: int, seed: int) -> list[dict]:
    """Each score's Spearman correlation with the force RMSE over ``part``'s structures."""
    error = part["force_rmse"].to_numpy(dtype=float)
    has_error = np.isfinite(error)
    if has_error.sum() <= 2:
        return []
    rows = []
    for score in _scores_of(part):
        x, y = part[score].to_numpy(dtype=float)[has_error], error[has_error]
        groups = part["bootstrap_group"].to_numpy()[has_error]
        low, high = bootstrap_interval(spearman, (x, y), n_resamples, seed, groups=groups)
        rows.append({"family": family, "dataset": dataset, "score": score, "metric": "spearman_vs_force_rmse",
                     "value": spearman(x, y), "ci_low": low, "ci_high": high, "n": int(has_error.sum())})
    return rows


def _roc_rows(family: str, dataset: str, group: pd.DataFrame, positives: np.ndarray, negatives: np.ndarray,
              n_resamples: int, seed: int) -> list[dict]:
    """Each score's ROC-AUC, ``positives`` (OOD) against ``negatives`` (in distribution)."""
    if not positives.any() or not negatives.any():
        return []
    keep = positives | negatives
    rows = []
    for score in _scores_of(group):
        values, labels = group[score].to_numpy(dtype=float)[keep], positives[keep]
        low, high = bootstrap_interval(roc_auc, (values, labels), n_resamples, seed, strata=labels,
                                       groups=group["bootstrap_group"].to_numpy()[keep])
        rows.append({"family": family, "dataset": dataset, "score": score,
                     "metric": "roc_auc_ood_vs_in_distribution", "value": roc_auc(values, labels),
                     "ci_low": low, "ci_high": high, "n": int(keep.sum())})
    return rows


def evaluate_run(
    run_dir: str | Path, n_resamples: int = 1000, forces_key: str = "REF_forces", seed: int = 0,
    labels: dict[str, bool] | None = None, data: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Per (family, dataset) and pooled per family (``dataset`` = ``all``): every score's Spearman
    with the force error and its ROC-AUC, OOD structures against in-distribution ones (the held-out
    calibration part of the training set and anything labelled in distribution), with bootstrap
    95 % intervals. ``data``: :func:`evaluation_data` of the run when already read (the force
    errors stream every labelled frame: read them once)."""
    data = evaluation_data(run_dir, forces_key, labels) if data is None else data
    rows = []
    for family, group in data.groupby("family", sort=False):
        group = group.reset_index(drop=True)
        is_ood = group["ood_label"].to_numpy(dtype=bool)
        for dataset in dict.fromkeys(group["dataset"]):
            in_dataset = (group["dataset"] == dataset).to_numpy()
            rows += _roc_rows(family, dataset, group, is_ood & in_dataset, ~is_ood, n_resamples, seed)
            rows += _spearman_rows(family, dataset, group[in_dataset], n_resamples, seed)
        rows += _roc_rows(family, "all", group, is_ood, ~is_ood, n_resamples, seed)
        rows += _spearman_rows(family, "all", group, n_resamples, seed)
    table = pd.DataFrame(rows, columns=EVALUATION_COLUMNS)
    if "labels_note" in data.attrs:
        table.attrs["labels_note"] = data.attrs["labels_note"]
    table.attrs["flag_note"] = in_distribution_flags(data)
    table.attrs["error_note"] = error_coverage(data)
    return table


def error_coverage(data: pd.DataFrame) -> str:
    """How often ``force_rmse_upper`` bounded the true force RMSE, per (family, dataset), on the
    structures the error model was not fitted on; and where the prediction is a lower bound (beyond
    the validation range), how often the true error is at or above it and their median ratio."""
    if "force_rmse_upper" not in data.columns:
        return ""
    fitted = data["error_fit"].fillna(False).astype(bool) if "error_fit" in data.columns else False
    labelled = data[np.isfinite(data["force_rmse"].to_numpy(dtype=float)) & ~fitted]
    floor = (labelled["force_rmse_is_lower_bound"].fillna(False).astype(bool) if "force_rmse_is_lower_bound"
             in labelled.columns else pd.Series(False, index=labelled.index))
    lines = []
    for (family, dataset), part in labelled.groupby(["family", "dataset"], sort=False):
        bounded = part[~floor[part.index] & np.isfinite(part["force_rmse_upper"].to_numpy(dtype=float))]
        if len(bounded):
            covered = int((bounded["force_rmse"] <= bounded["force_rmse_upper"]).sum())
            lines.append(f"  {family} on {dataset}: upper bound covers {covered} of {len(bounded)} "
                         f"({100 * covered / len(bounded):.1f} %); median |predicted - true| "
                         f"{np.median(np.abs(bounded['predicted_force_rmse'] - bounded['force_rmse'])):.4f} eV/A")
        floors = part[floor[part.index]]
        if len(floors):
            held = int((floors["force_rmse"] >= floors["force_rmse_lower"]).sum())
            ratio = float(np.median(floors["force_rmse"] / floors["force_rmse_lower"]))
            lines.append(f"  {family} on {dataset}: lower bound (>=) holds for {held} of {len(floors)} "
                         f"({100 * held / len(floors):.1f} %); median true / reported {ratio:.2f}")
    if not lines:
        return ""
    level = data.attrs.get("error_level", 0.9)
    return (f"force errors on structures the error model was not fitted on (force_rmse_upper: the {level:.0%} "
            "conformal bound, for data drawn like the validation runs; beyond them the prediction is a lower bound):\n"
            + "\n".join(lines))


def plot_errors(data_or_run: pd.DataFrame | str | Path, path: str | Path, forces_key: str = "REF_forces") -> Path | None:
    """Expected (predicted) against observed force RMSE per structure, with the upper bound."""
    data = data_or_run if isinstance(data_or_run, pd.DataFrame) else evaluation_data(data_or_run, forces_key)
    if "predicted_force_rmse" not in data.columns:
        return None
    data = data[np.isfinite(data["force_rmse"].to_numpy(dtype=float))
                & np.isfinite(data["predicted_force_rmse"].to_numpy(dtype=float))]
    if data.empty:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for (family, dataset), part in data.groupby(["family", "dataset"], sort=False):
        ax.scatter(part["predicted_force_rmse"], part["force_rmse"], s=10, label=f"{family} on {dataset}")
    top = float(np.nanmax(data[["force_rmse", "predicted_force_rmse"]].to_numpy()))
    ax.plot([0, top], [0, top], color="k", linewidth=0.8, linestyle="--", label="observed = expected")
    order = np.argsort(data["predicted_force_rmse"].to_numpy())
    ax.step(data["predicted_force_rmse"].to_numpy()[order], data["force_rmse_upper"].to_numpy()[order], where="post",
            color="tab:red", linewidth=0.8, label="upper bound")
    ax.set_xlabel("expected force RMSE (eV/Å)")
    ax.set_ylabel("observed force RMSE (eV/Å)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def in_distribution_flags(data: pd.DataFrame) -> str:
    """How often ``ood`` fired on what is labelled in distribution, per (family, dataset): the
    false-flag rate the conformal rule promises to keep at alpha (held-out calibration rows are
    scored with their own group left out, like new data)."""
    alpha = data.attrs.get("alpha")
    lines = []
    for (family, dataset), part in data[~data["ood_label"].astype(bool)].groupby(["family", "dataset"], sort=False):
        flagged = int(part["ood"].astype(bool).sum())
        lines.append(f"  {family} on {dataset}: {flagged} of {len(part)} flagged ({100 * flagged / len(part):.1f} %)")
    if not lines:
        return ""
    return (f"ood flags on in-distribution structures (alpha = {alpha:g}: the rate expected over many "
            "new structures drawn alike; a few runs of correlated frames scatter widely around it):\n"
            + "\n".join(lines))


def plot_evaluation(table: pd.DataFrame, path: str | Path) -> Path:
    """Bars per score of the pooled metrics of each family, with their intervals."""
    table = table[table["dataset"] == "all"]
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
