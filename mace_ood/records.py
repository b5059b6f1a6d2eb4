"""Small typed records that cross the task boundary: jobs and evaluations in, summaries out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict

from mace_ood.paths import evaluation_label


@dataclass(frozen=True)
class ExtractionJob:
    """One (family, seed, dataset): run one model over one dataset into one latent file."""

    family: str
    seed: int
    model_path: str
    dataset: str
    files: tuple[str, ...]
    out_path: str
    n_structures: int = 0  # expected, for progress
    model_sha256: str | None = None  # the model file's content when planned; the worker checks it
    head: str | None = None  # readout head for forces and energies (None: the model's default)
    llpr_forces: bool = False  # also the LLPR force Jacobian: a family of one model (no committee deviation)

    @property
    def name(self) -> str:
        return f"{self.family}-seed{self.seed}-{self.dataset}"


@dataclass(frozen=True)
class EvaluationPlan:
    """One (family, dataset) to score, with its seed files."""

    family: str
    dataset: str
    reference: bool
    latent_paths: tuple[str, ...]
    shown: bool = True  # False: extracted only to fit the family's reference
    validation: bool = False  # the family's labelled validation set (fits its force-error model)

    @property
    def label(self) -> str:
        return evaluation_label(self.family, self.dataset)


def own_evaluation(evaluations: list[EvaluationPlan], family: str) -> EvaluationPlan:
    """The evaluation of ``family`` on its own training set (the plan has one per family)."""
    return next(e for e in evaluations if e.family == family and e.reference)


def validation_evaluations(evaluations: list[EvaluationPlan]) -> dict[str, EvaluationPlan]:
    """Each family's evaluation on its labelled validation set, for the families that have one."""
    return {e.family: e for e in evaluations if e.validation}


class SkippedStructure(TypedDict, total=False):
    family: str
    seed: int
    dataset: str
    structure_id: str
    source_file: str
    frame_index: int
    reason: str


class ExtractionResult(TypedDict):
    """What an extraction task returns (see ``ExtractionSummary``), with its job's identity."""

    path: str
    model_path: str
    model_sha256: str
    n_structures: int
    n_atoms: int
    skipped: list[SkippedStructure]
    forward_passes: int
    computed_structures: int
    copied_structures: int
    resumed_structures: int
    split_structures: int
    wall_s: float
    smallest_batch: int
    reused: bool
    atoms_per_s: float
    family: str
    seed: int
    dataset: str
    worker: str


class ScoreResult(TypedDict):
    """What a fit-reference or score task returns: the file it wrote and where it ran."""

    label: str
    path: str
    worker: str
    device: str
    wall_s: float


class EvaluationSummary(TypedDict):
    evaluation: str
    family: str
    dataset: str
    reference: bool
    n_models: int
    n_structures: int
    n_atoms: int
    score: str
    median_score: float
    max_score: float
    n_ood: int
    alpha: float
    n_calibration: int
    n_groups: int  # independent groups (runs) of the training set: what the flag's rate is stated over
    grouping: str  # how they were found, in words
    delivered_rate: float
    combined_of: str
    threshold: float
    alpha_note: str
    strategy: str
    n_candidates: int
    n_selected: int
    n_selected_ood: int
    selection_note: str
    top_structure: str
    top_dir: str


class SelectionResult(TypedDict):
    """What a select task returns: its decisions table, its summary (JSON) and its wall time."""

    label: str
    table: str
    summary: str
    wall_s: float
    worker: str


class ReportResult(TypedDict, total=False):
    """What the report task returns: output paths, one summary per evaluation, the top rows."""

    paths: dict[str, str]
    summary: list[EvaluationSummary]
    top: dict[str, list[dict]]
    extractions: list[dict]
    scoring: list[dict]
    selection: list[dict]
