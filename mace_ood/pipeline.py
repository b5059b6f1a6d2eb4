"""The run, step by step, without Prefect: plan, extract, score, report.

``flows/`` and ``tasks/`` wrap these functions; they can also be called directly.
"""

from __future__ import annotations

import glob
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from mace_ood.config import ModelFile, RunConfig, ScoresConfig
from mace_ood.models import ModelError, check_family, describe_model, sha256_of
from mace_ood.reference import FamilyReference, fit_reference
from mace_ood.report import (
    evaluation_label,
    evaluation_table,
    order_columns,
    write_csv,
    write_excel,
    write_scores_netcdf,
    write_selected,
    write_text,
)
from mace_ood.scores import ALL_SCORES, compute_scores, percentile_against
from mace_ood.scoring import open_latents
from mace_ood.structures import InputError, count_structures, resolve_files
from mace_ood.visual import plot_latent_pca, write_chemiscope

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractionJob:
    family: str
    seed: int
    model_path: str
    dataset: str
    files: tuple[str, ...]
    out_path: str
    n_structures: int = 0  # expected, for progress

    @property
    def name(self) -> str:
        return f"{self.family}-seed{self.seed}-{self.dataset}"


@dataclass(frozen=True)
class EvaluationPlan:
    family: str
    dataset: str
    reference: bool
    latent_paths: tuple[str, ...]
    shown: bool = True  # False: extracted only to fit the family's reference

    @property
    def label(self) -> str:
        return evaluation_label(self.family, self.dataset)


@dataclass
class RunPlan:
    jobs: list[ExtractionJob] = field(default_factory=list)
    evaluations: list[EvaluationPlan] = field(default_factory=list)
    models: dict[str, list[dict]] = field(default_factory=dict)
    files: dict[str, list[str]] = field(default_factory=dict)


def latent_path(output_dir: Path, family: str, dataset: str, seed: int) -> Path:
    return output_dir / "latents" / family / dataset / f"seed-{seed}.nc"


def resolve_models(family: str, entries: list[str | ModelFile]) -> list[str]:
    """Model files of a family, globs expanded; pinned SHA-256s are checked before any load."""
    paths: list[str] = []
    for entry in entries:
        pattern = entry.path if isinstance(entry, ModelFile) else entry
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if Path(m).is_file()]
        if not matches:
            raise ModelError(f"family {family!r}: {pattern}: matches no model file")
        if isinstance(entry, ModelFile):
            for match in matches:
                actual = sha256_of(match)
                if actual != entry.sha256.lower():
                    raise ModelError(f"{match}: SHA-256 is {actual}, the config pins {entry.sha256.lower()}; not loading it")
        paths.extend(str(Path(m).resolve()) for m in matches)
    return list(dict.fromkeys(paths))


def check_output_dir(output_dir: Path) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise InputError(f"{output_dir}: output directory is not writable ({exc.strerror})") from None


def plan_run(config: RunConfig, count: bool = True) -> RunPlan:
    """Resolve globs, check every model family and the output folder, list the jobs.

    Everything that would stop the run is found here, before any extraction. ``count``:
    also count the structures of each dataset (for progress reports).
    """
    output_dir = Path(config.output_dir)
    check_output_dir(output_dir)
    shown = config.evaluation_pairs()
    pairs = [(family, dataset, reference, True) for family, dataset, reference in shown]
    for family in dict.fromkeys(family for family, _, _ in shown):
        own = config.model_families[family].trained_on
        if not any(f == family and d == own for f, d, _, _ in pairs):
            pairs.append((family, own, True, False))
    plan = RunPlan()
    counts = {}
    for dataset in dict.fromkeys(dataset for _, dataset, _, _ in pairs):
        plan.files[dataset] = resolve_files(config.datasets[dataset], dataset)
        counts[dataset] = count_structures(plan.files[dataset]) if count else 0
    for family in dict.fromkeys(family for family, _, _, _ in pairs):
        paths = resolve_models(family, config.model_families[family].models)
        infos = [describe_model(p, config.layers) for p in paths]
        check_family(family, infos)
        plan.models[family] = [info.as_dict() for info in infos]
    for family, dataset, reference, is_shown in pairs:
        outputs = []
        for seed, info in enumerate(plan.models[family]):
            out = latent_path(output_dir, family, dataset, seed)
            plan.jobs.append(
                ExtractionJob(family, seed, info["path"], dataset, tuple(plan.files[dataset]), str(out), counts[dataset])
            )
            outputs.append(str(out))
        plan.evaluations.append(EvaluationPlan(family, dataset, reference, tuple(outputs), is_shown))
    return plan


def reference_evaluation(plan_evaluations: list[EvaluationPlan], family: str) -> EvaluationPlan:
    return next(e for e in plan_evaluations if e.family == family and e.reference)


def scores_path(output_dir: Path, label: str) -> Path:
    return output_dir / "scores" / f"{label}.nc"


def reference_path(output_dir: Path, family: str) -> Path:
    return output_dir / "reference" / f"{family}.pkl"


def fit_family_reference(evaluation: EvaluationPlan, output_dir: str | Path, scores: ScoresConfig) -> str:
    """Fit the family's reference (alignment, covariance, GMM, k-NN sample) on its own training set."""
    with open_latents(list(evaluation.latent_paths)) as latents:
        reference = fit_reference(
            latents["latent"], max_atoms=scores.reference_max_atoms, knn_k=scores.knn_k, ridge=scores.ridge,
            gmm_components=tuple(scores.gmm_components), gmm_max_atoms=scores.gmm_max_atoms,
        )
    return str(reference.save(reference_path(Path(output_dir), evaluation.family)))


def score_evaluation(
    evaluation: EvaluationPlan, output_dir: str | Path, chunk_atoms: int, reference_file: str | None = None
) -> str:
    """Every score of one evaluation, computed once and stored to ``scores/<label>.nc``."""
    reference = FamilyReference.load(reference_file) if reference_file else None
    with open_latents(list(evaluation.latent_paths), chunk_atoms=chunk_atoms) as latents:
        scores = compute_scores(latents, reference)
        scores.attrs.update({
            "family": evaluation.family, "dataset": evaluation.dataset,
            "reference": int(evaluation.reference), "seed_files": json.dumps(evaluation.latent_paths),
        })
        return str(write_scores_netcdf(scores, scores_path(Path(output_dir), evaluation.label)))


def add_percentiles(tables: dict[str, pd.DataFrame], evaluations: list[EvaluationPlan], select) -> None:
    """``<score>_percentile`` against the family's own training set, and the ``ood`` flag."""
    for evaluation in evaluations:
        table = tables[evaluation.label]
        reference = tables[reference_evaluation(evaluations, evaluation.family).label]
        for score in [c for c in ALL_SCORES if c in table.columns]:
            table[f"{score}_percentile"] = percentile_against(table[score].to_numpy(), reference[score].to_numpy())
        table["ood"] = table[f"{select.score}_percentile"] > select.ood_percentile


def build_report(
    config: RunConfig,
    evaluations: list[EvaluationPlan],
    score_files: list[str],
    skipped: list[dict],
) -> dict:
    """scores.csv, top-K CIF/extxyz, skipped.csv and report.xlsx; returns paths and top rows."""
    output_dir = Path(config.output_dir)
    selected, summary_rows = {}, []
    top_k = config.select.top_k
    score = config.select.score
    by_label = {
        e.label: evaluation_table(path, e.family, e.dataset, e.reference, score, config.metadata.patterns)
        for e, path in zip(evaluations, score_files, strict=True)
    }
    add_percentiles(by_label, evaluations, config.select)
    shown = [(e, p) for e, p in zip(evaluations, score_files, strict=True) if e.shown]
    tables = [by_label[e.label] for e, _ in shown]
    for evaluation, path in shown:
        table = by_label[evaluation.label]
        top = write_selected(table, path, output_dir / "top" / evaluation.label, top_k, score)
        selected[evaluation.label] = order_columns(top, score)
        summary_rows.append({
            "evaluation": evaluation.label,
            "family": evaluation.family,
            "dataset": evaluation.dataset,
            "reference": evaluation.reference,
            "n_structures": len(table),
            "n_atoms": int(table["n_atoms"].sum()),
            "score": score,
            "median_score": float(table[score].median()),
            "max_score": float(table[score].max()),
            "n_ood": int(table["ood"].sum()),
            "ood_percentile": config.select.ood_percentile,
            "top_structure": table.iloc[0]["structure_id"],
            "top_dir": str(output_dir / "top" / evaluation.label),
        })
    all_scores = order_columns(pd.concat(tables, ignore_index=True), score)
    skipped_frame = pd.DataFrame(
        skipped, columns=["family", "seed", "dataset", "structure_id", "source_file", "frame_index", "reason"]
    )
    if len(skipped_frame):  # one row per structure and reason, with the seeds that skipped it
        keys = ["family", "dataset", "structure_id", "source_file", "frame_index", "reason"]
        skipped_frame = (
            skipped_frame.astype({"seed": str}).groupby(keys, sort=False, dropna=False)["seed"]
            .agg(",".join).rename("seeds").reset_index()
        )
    summary = pd.DataFrame(summary_rows)
    paths = {
        "run_config": str(write_text(config.model_dump_json(indent=2), output_dir / "run_config.json")),
        "scores_csv": str(write_csv(all_scores, output_dir / "scores.csv")),
        "skipped_csv": str(write_csv(skipped_frame, output_dir / "skipped.csv")),
        "report_xlsx": str(write_excel(output_dir / "report.xlsx", summary, selected, skipped_frame, score)),
    }
    for evaluation, path in shown:
        reference = reference_evaluation(evaluations, evaluation.family)
        title = f"{evaluation.family} on {evaluation.dataset}"
        plot_latent_pca(
            evaluation.latent_paths[0], reference.latent_paths[0], path, score,
            output_dir / "plots" / f"{evaluation.label}_latent_pca.png", title,
        )
        write_chemiscope(
            by_label[evaluation.label], path, evaluation.latent_paths[0],
            output_dir / "chemiscope" / f"{evaluation.label}.json.gz", score,
        )
    paths["latent_pca_plots"] = str(output_dir / "plots")
    paths["chemiscope"] = str(output_dir / "chemiscope")
    plot = plot_score_histograms(
        tables, [by_label[reference_evaluation(evaluations, e.family).label] for e, _ in shown],
        score, config.select.ood_percentile, output_dir / f"{score}_hist.png",
    )
    if plot:
        paths["histogram_png"] = plot
    return {
        "paths": paths,
        "summary": summary.to_dict(orient="records"),
        "top": {
            label: frame.head(5)[["rank", score, f"{score}_percentile", "ood", "structure_id", "formula", "n_atoms"]]
            .rename(columns={score: "score", f"{score}_percentile": "percentile"}).to_dict(orient="records")
            for label, frame in selected.items()
        },
    }


def plot_score_histograms(
    tables: list[pd.DataFrame], references: list[pd.DataFrame], score: str, percentile: float, path: Path
) -> str | None:
    """Per evaluation: the score histogram, its family's training-set histogram and the OOD threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from mace_ood.report import atomic_path

    if not tables:
        return None
    fig, axes = plt.subplots(len(tables), 1, figsize=(7, 2.4 * len(tables)), squeeze=False)
    for ax, table, reference in zip(axes[:, 0], tables, references, strict=True):
        values = table[score].to_numpy()
        ref_values = reference[score].to_numpy()
        both = np.concatenate([values, ref_values])
        both = both[np.isfinite(both)]
        if both.size == 0:
            continue
        bins = np.linspace(both.min(), both.max(), 40) if both.min() != both.max() else 10
        family, dataset = table["family"].iloc[0], table["dataset"].iloc[0]
        ax.hist(ref_values, bins=bins, alpha=0.45, label=f"{family} training set (reference)", color="tab:grey")
        if not table["reference"].iloc[0]:
            ax.hist(values, bins=bins, alpha=0.6, label=f"{dataset}", color="tab:red")
        threshold = np.nanpercentile(ref_values, percentile)
        ax.axvline(threshold, color="k", linestyle="--", linewidth=1, label=f"{percentile:g}th percentile")
        ax.set_title(f"{family} on {dataset}", fontsize=9)
        ax.set_ylabel("structures")
        ax.legend(fontsize=7)
    axes[-1, 0].set_xlabel(score)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return str(path)


def format_summary(result: dict) -> str:
    """Terminal summary: top 5 per evaluation and where the files are."""
    lines = []
    for row in result["summary"]:
        ref = " (in-distribution reference)" if row["reference"] else ""
        lines.append(
            f"\n{row['family']} -> {row['dataset']}{ref}: {row['n_structures']} structures, "
            f"{row['n_atoms']} atoms; {row['n_ood']} above the {row['ood_percentile']:g}th percentile "
            f"of the training set ({row['score']})"
        )
        lines.append(f"  {'rank':>4}  {row['score']:>15}  {'pctl':>6}  {'n_atoms':>7}  structure")
        for top in result["top"][row["evaluation"]]:
            lines.append(
                f"  {top['rank']:>4}  {top['score']:>15.4e}  {top['percentile']:>6.1f}  {top['n_atoms']:>7}  "
                f"{top['structure_id']} ({top['formula']})"
            )
        lines.append(f"  files: {row['top_dir']}")
    lines.append("")
    for key, path in result["paths"].items():
        lines.append(f"{key:>16}: {path}")
    return "\n".join(lines)
