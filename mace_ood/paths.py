"""Where every output of a run lives, relative to ``output_dir`` (one place for path conventions)."""

from __future__ import annotations

from pathlib import Path


def evaluation_label(family: str, dataset: str) -> str:
    return f"{family}__{dataset}"


def latent_path(output_dir: str | Path, family: str, dataset: str, seed: int) -> Path:
    return Path(output_dir) / "latents" / family / dataset / f"seed-{seed}.nc"


def scores_path(output_dir: str | Path, label: str) -> Path:
    return Path(output_dir) / "scores" / f"{label}.nc"


def reference_path(output_dir: str | Path, family: str) -> Path:
    return Path(output_dir) / "reference" / f"{family}.pkl"


def selection_path(output_dir: str | Path, label: str) -> Path:
    """The select stage's decisions for one evaluation: every structure's scores, p-value, flag and pick."""
    return Path(output_dir) / "selection" / f"{label}.csv"


def selection_summary_path(output_dir: str | Path, label: str) -> Path:
    """What the select stage tells about one evaluation (its summary row, as JSON)."""
    return Path(output_dir) / "selection" / f"{label}.json"


def top_dir(output_dir: str | Path, label: str) -> Path:
    return Path(output_dir) / "top" / label


def latent_pca_plot_path(output_dir: str | Path, label: str) -> Path:
    return Path(output_dir) / "plots" / f"{label}_latent_pca.png"


def chemiscope_path(output_dir: str | Path, label: str) -> Path:
    return Path(output_dir) / "chemiscope" / f"{label}.json.gz"


def histogram_path(output_dir: str | Path, score: str) -> Path:
    return Path(output_dir) / f"{score}_hist.png"


def partial_path(path: str | Path) -> Path:
    """Where a file is written until it is complete."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


def progress_path(out_path: str | Path) -> Path:
    """The resume record of a latent file being written."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + ".progress.json")
