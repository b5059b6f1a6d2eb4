"""Where every output of a run lives: :class:`RunPaths`, the one place for path conventions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


def evaluation_label(family: str, dataset: str) -> str:
    return f"{family}__{dataset}"


@dataclass(frozen=True)
class RunPaths:
    """Every file and folder of a run under ``root`` (its ``output_dir``): the plan, every stage, the
    Python API and ``mace-ood evaluate`` take their paths from here."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def manifest(self) -> Path:
        """The run's config, written when the run is planned (``mace_ood.open_run`` reads it)."""
        return self.root / "run_config.json"

    @property
    def status(self) -> Path:
        """The run's plan (every evaluation and its role) and whether it finished."""
        return self.root / "run.json"

    @property
    def scores_csv(self) -> Path:
        return self.root / "scores.csv"

    @property
    def skipped_csv(self) -> Path:
        return self.root / "skipped.csv"

    @property
    def report_xlsx(self) -> Path:
        return self.root / "report.xlsx"

    @property
    def scores_dir(self) -> Path:
        return self.root / "scores"

    @property
    def plots_dir(self) -> Path:
        return self.root / "plots"

    @property
    def chemiscope_dir(self) -> Path:
        return self.root / "chemiscope"

    def latent(self, family: str, dataset: str, seed: int) -> Path:
        return self.root / "latents" / family / dataset / f"seed-{seed}.nc"

    def scores(self, label: str) -> Path:
        return self.scores_dir / f"{label}.nc"

    def reference(self, family: str) -> Path:
        return self.root / "reference" / f"{family}.pkl"

    def selection(self, label: str) -> Path:
        """The select stage's decisions for one evaluation: every structure's scores, p-value, flag and pick."""
        return self.root / "selection" / f"{label}.csv"

    def selection_summary(self, label: str) -> Path:
        """What the select stage tells about one evaluation (its summary row, as JSON)."""
        return self.root / "selection" / f"{label}.json"

    def top(self, label: str) -> Path:
        return self.root / "top" / label

    def latent_pca_plot(self, label: str) -> Path:
        return self.plots_dir / f"{label}_latent_pca.png"

    def chemiscope(self, label: str) -> Path:
        return self.chemiscope_dir / f"{label}.json.gz"

    def histogram(self, score: str) -> Path:
        return self.root / f"{score}_hist.png"


def partial_path(path: str | Path) -> Path:
    """Where a file is written until it is complete."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


def progress_path(out_path: str | Path) -> Path:
    """The resume record of a latent file being written."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + ".progress.json")
