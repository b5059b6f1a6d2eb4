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

from mace_ood.config import RunConfig
from mace_ood.models import ModelError, check_family, describe_model
from mace_ood.report import (
    evaluation_label,
    evaluation_table,
    write_csv,
    write_excel,
    write_scores_netcdf,
    write_selected,
)
from mace_ood.scoring import latent_variance_scores, open_latents
from mace_ood.structures import InputError, resolve_files

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractionJob:
    family: str
    seed: int
    model_path: str
    dataset: str
    files: tuple[str, ...]
    out_path: str

    @property
    def name(self) -> str:
        return f"{self.family}-seed{self.seed}-{self.dataset}"


@dataclass(frozen=True)
class EvaluationPlan:
    family: str
    dataset: str
    reference: bool
    latent_paths: tuple[str, ...]

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


def resolve_models(family: str, patterns: list[str]) -> list[str]:
    paths: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if Path(m).is_file()]
        if not matches:
            raise ModelError(f"family {family!r}: {pattern}: matches no model file")
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


def plan_run(config: RunConfig) -> RunPlan:
    """Resolve globs, check every model family and the output folder, list the jobs.

    Everything that would stop the run is found here, before any extraction.
    """
    output_dir = Path(config.output_dir)
    check_output_dir(output_dir)
    pairs = config.evaluation_pairs()
    plan = RunPlan()
    for dataset in dict.fromkeys(dataset for _, dataset, _ in pairs):
        plan.files[dataset] = resolve_files(config.datasets[dataset], dataset)
    for family in dict.fromkeys(family for family, _, _ in pairs):
        paths = resolve_models(family, config.model_families[family].models)
        infos = [describe_model(p, config.layers) for p in paths]
        check_family(family, infos)
        plan.models[family] = [info.as_dict() for info in infos]
    for family, dataset, reference in pairs:
        outputs = []
        for seed, info in enumerate(plan.models[family]):
            out = latent_path(output_dir, family, dataset, seed)
            plan.jobs.append(
                ExtractionJob(family, seed, info["path"], dataset, tuple(plan.files[dataset]), str(out))
            )
            outputs.append(str(out))
        plan.evaluations.append(EvaluationPlan(family, dataset, reference, tuple(outputs)))
    return plan


def scores_path(output_dir: Path, label: str) -> Path:
    return output_dir / "scores" / f"{label}.nc"


def score_evaluation(evaluation: EvaluationPlan, output_dir: str | Path, chunk_atoms: int) -> str:
    """Lazy latent variance of one evaluation, computed once and stored to ``scores/<label>.nc``."""
    ds = open_latents(list(evaluation.latent_paths), chunk_atoms=chunk_atoms)
    try:
        scores = latent_variance_scores(ds)
        scores.attrs.update({
            "family": evaluation.family, "dataset": evaluation.dataset,
            "reference": int(evaluation.reference), "seed_files": json.dumps(evaluation.latent_paths),
        })
        return str(write_scores_netcdf(scores, scores_path(Path(output_dir), evaluation.label)))
    finally:
        ds.close()


def build_report(
    config: RunConfig,
    evaluations: list[EvaluationPlan],
    score_files: list[str],
    skipped: list[dict],
) -> dict:
    """scores.csv, top-K CIF/extxyz, skipped.csv and report.xlsx; returns paths and top rows."""
    output_dir = Path(config.output_dir)
    tables, selected, summary_rows = [], {}, []
    top_k = config.select.top_k
    for evaluation, path in zip(evaluations, score_files, strict=True):
        table = evaluation_table(path, evaluation.family, evaluation.dataset, evaluation.reference,
                                 config.metadata.patterns)
        tables.append(table)
        top = write_selected(table, path, output_dir / "top" / evaluation.label, top_k)
        selected[evaluation.label] = top
        summary_rows.append({
            "evaluation": evaluation.label,
            "family": evaluation.family,
            "dataset": evaluation.dataset,
            "reference": evaluation.reference,
            "n_structures": len(table),
            "n_atoms": int(table["n_atoms"].sum()),
            "mean_latent_variance": float(table["latent_variance"].mean()),
            "median_latent_variance": float(table["latent_variance"].median()),
            "max_latent_variance": float(table["latent_variance"].max()),
            "top_structure": table.iloc[0]["structure_id"],
            "top_dir": str(output_dir / "top" / evaluation.label),
        })
    all_scores = pd.concat(tables, ignore_index=True)
    skipped_frame = pd.DataFrame(
        skipped, columns=["family", "seed", "dataset", "structure_id", "source_file", "frame_index", "reason"]
    )
    summary = pd.DataFrame(summary_rows)
    paths = {
        "scores_csv": str(write_csv(all_scores, output_dir / "scores.csv")),
        "skipped_csv": str(write_csv(skipped_frame, output_dir / "skipped.csv")),
        "report_xlsx": str(write_excel(output_dir / "report.xlsx", summary, selected, skipped_frame)),
    }
    plot = plot_score_histograms(tables, output_dir / "latent_variance_hist.png")
    if plot:
        paths["histogram_png"] = plot
    return {
        "paths": paths,
        "summary": summary.to_dict(orient="records"),
        "top": {
            label: frame.head(5)[["rank", "latent_variance", "structure_id", "formula", "n_atoms"]].to_dict(orient="records")
            for label, frame in selected.items()
        },
    }


def plot_score_histograms(tables: list[pd.DataFrame], path: Path) -> str | None:
    """One histogram per evaluation (log-spaced bins), on shared axes."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        return None
    from mace_ood.report import atomic_path

    values = [t["latent_variance"].to_numpy() for t in tables]
    positive = np.concatenate([v[v > 0] for v in values]) if values else np.array([])
    if positive.size == 0:
        return None
    bins = np.logspace(np.log10(positive.min()), np.log10(positive.max()), 40)
    fig, ax = plt.subplots(figsize=(7, 4))
    for table, vals in zip(tables, values, strict=True):
        label = f"{table['family'].iloc[0]} on {table['dataset'].iloc[0]}"
        if table["reference"].iloc[0]:
            label += " (own training set)"
        ax.hist(vals, bins=bins, histtype="step", linewidth=1.5, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("latent variance U (per structure)")
    ax.set_ylabel("structures")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return str(path)


def format_summary(result: dict) -> str:
    """Terminal summary: top 5 per evaluation and where the files are."""
    lines = []
    for row in result["summary"]:
        ref = " (in-distribution reference)" if row["reference"] else ""
        lines.append(
            f"\n{row['family']} -> {row['dataset']}{ref}: {row['n_structures']} structures, "
            f"{row['n_atoms']} atoms, median U = {row['median_latent_variance']:.3e}"
        )
        lines.append(f"  {'rank':>4}  {'latent_variance':>15}  {'n_atoms':>7}  structure")
        for top in result["top"][row["evaluation"]]:
            lines.append(
                f"  {top['rank']:>4}  {top['latent_variance']:>15.4e}  {top['n_atoms']:>7}  "
                f"{top['structure_id']} ({top['formula']})"
            )
        lines.append(f"  files: {row['top_dir']}")
    lines.append("")
    for key, path in result["paths"].items():
        lines.append(f"{key:>14}: {path}")
    return "\n".join(lines)
