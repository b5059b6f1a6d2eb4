"""Training sets of the shape users have, for the committed trained test models (tests/data/models).

A MACE training file is usually a handful of MD runs concatenated in one extxyz file, each run at
its own temperature and strain (and, for an alloy, its own ordering). :func:`md_runs` draws such
runs with ASE's EMT (vectorised: :mod:`mace_ood.emt`); new in-distribution runs are drawn the same
way with other seeds. ``python -m tests.data.make_models`` trains the committed models on
:data:`TRAINING_SETS`; the fixtures regenerate the same files and check their fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import ase.io
import numpy as np
from ase import Atoms
from ase.build import bulk

from mace_ood.demo import md_frames

MODELS_DIR = Path(__file__).parent / "data" / "models"
MANIFEST = MODELS_DIR / "manifest.json"
N_SEEDS = 4


@dataclass(frozen=True)
class RunDraw:
    """How a family's MD runs are drawn: each run its own temperature, strain and (alloy) ordering."""

    system: str  # "CuAu" (Cu3Au-like random alloy) or "Pd"
    repeat: int = 2
    temperatures_K: tuple[float, float] = (250.0, 650.0)
    strains: tuple[float, float] = (-0.015, 0.015)
    gold_fraction: tuple[float, float] = (0.25, 0.25)  # CuAu: each run's share of Au


@dataclass(frozen=True)
class TrainingSet:
    family: str
    draw: RunDraw
    runs: int
    frames_per_run: int
    first_seed: int


# few runs (the usual training file) and many runs (what a block split assumed), both in one file
TRAINING_SETS = {
    "CuAu": TrainingSet("CuAu", RunDraw("CuAu", temperatures_K=(200.0, 1000.0), strains=(-0.03, 0.03),
                                        gold_fraction=(0.15, 0.35)),
                        runs=4, frames_per_run=30, first_seed=100),
    "Pd": TrainingSet("Pd", RunDraw("Pd"), runs=32, frames_per_run=4, first_seed=500),
}
ATOMIC_NUMBERS = {"CuAu": (29, 79), "Pd": (46,)}


def run_start(draw: RunDraw, seed: int) -> tuple[Atoms, float]:
    """A run's first cell and temperature, drawn from ``seed``: its temperature, strain and (alloy)
    composition and ordering."""
    rng = np.random.default_rng(seed)
    temperature = float(rng.uniform(*draw.temperatures_K))
    strain = float(rng.uniform(*draw.strains))
    n = draw.repeat
    if draw.system == "Pd":
        atoms = bulk("Pd", "fcc", a=3.89, cubic=True) * (n, n, n)
    else:
        atoms = bulk("Cu", "fcc", a=3.70, cubic=True) * (n, n, n)
        numbers = np.full(len(atoms), 29)
        gold = int(round(rng.uniform(*draw.gold_fraction) * len(atoms)))
        numbers[rng.choice(len(atoms), gold, replace=False)] = 79
        atoms.set_atomic_numbers(numbers)
    atoms.set_cell(atoms.cell * (1 + strain), scale_atoms=True)
    return atoms, temperature


def md_runs(draw: RunDraw, seeds: range | list[int], frames_per_run: int) -> list[Atoms]:
    """Runs drawn with ``seeds``, concatenated; each frame's run in ``info["run"]`` (for checking)."""
    frames = []
    for seed in seeds:
        atoms, temperature = run_start(draw, seed)
        for frame in md_frames(atoms, temperature, seed=seed, n_frames=frames_per_run):
            frame.info["run"] = int(seed)
            frames.append(frame)
    return frames


def training_frames(family: str) -> list[Atoms]:
    spec = TRAINING_SETS[family]
    return md_runs(spec.draw, range(spec.first_seed, spec.first_seed + spec.runs), spec.frames_per_run)


def fingerprint(frames: list[Atoms]) -> str:
    """Positions and reference forces to 1e-5: what the models were trained on."""
    digest = hashlib.sha256()
    for atoms in frames:
        digest.update(np.round(atoms.positions, 5).tobytes())
        digest.update(np.round(atoms.arrays["REF_forces"], 5).tobytes())
    return digest.hexdigest()[:16]


def write_training_file(family: str, folder: Path, check: bool = True) -> Path:
    """The family's training file, one extxyz of all its runs, written to ``folder``. ``check``:
    its fingerprint must be the one the committed models were trained on."""
    frames = training_frames(family)
    if check:
        expected = json.loads(MANIFEST.read_text())[family]["fingerprint"]
        if fingerprint(frames) != expected:
            raise AssertionError(f"{family}: the regenerated training set is not the one the committed models "
                                 "were trained on; remake them: python -m tests.data.make_models")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{family}_train.extxyz"
    ase.io.write(path, [_without_run(a) for a in frames], format="extxyz")
    return path


def _without_run(atoms: Atoms) -> Atoms:
    atoms = atoms.copy()
    atoms.info.pop("run", None)
    return atoms


def model_paths(family: str) -> list[Path]:
    return [MODELS_DIR / f"{family}_seed{k}.model" for k in range(N_SEEDS)]


def score_family(root: Path, family: str, frames: list[Atoms] | dict[str, list[Atoms]], forces: bool = True,
                 seeds: tuple[int, ...] = tuple(range(N_SEEDS))):
    """The committed ``family`` (its models ``seeds``: one of them is a family of one model, with the
    LLPR force Jacobian stored as a run would) scoring its own training file and ``frames`` (dataset
    ``new``, or several datasets by name), Prefect-free: extraction, reference, scores. Returns the
    training set's evaluation, the other one (or a dict of them) and every evaluation's scores file by label."""
    from mace_ood.config import ExtractionSettings, ScoresConfig
    from mace_ood.extract.stream import extract_to_netcdf
    from mace_ood.records import EvaluationPlan
    from mace_ood.score.evaluation import fit_family_reference, score_evaluation

    datasets = frames if isinstance(frames, dict) else {"new": frames}
    files = {"train": write_training_file(family, root / "data")}
    for name, structures in datasets.items():
        files[name] = root / "data" / f"{name}.extxyz"
        ase.io.write(files[name], structures, format="extxyz")
    settings = ExtractionSettings(device="cpu", default_dtype="float32", batch_size=8, forces=forces)
    latent_paths: dict[str, list[str]] = {name: [] for name in files}
    for name, path in files.items():
        for seed in seeds:
            out = root / "latents" / name / f"seed-{seed}.nc"
            out.parent.mkdir(parents=True, exist_ok=True)
            extract_to_netcdf(str(model_paths(family)[seed]), [str(path)], out, settings, llpr_forces=len(seeds) == 1)
            latent_paths[name].append(str(out))
    own = EvaluationPlan(family, "train", True, tuple(latent_paths["train"]))
    others = {name: EvaluationPlan(family, name, False, tuple(latent_paths[name])) for name in datasets}
    reference = fit_family_reference(own, root, ScoresConfig())
    scored = {e.label: score_evaluation(e, root, 4096, reference) for e in (own, *others.values())}
    return own, (others if isinstance(frames, dict) else others["new"]), scored


def calibrated_tables(own, new, files, select):
    """:func:`mace_ood.score.calibrate.calibrate_run` of :func:`score_family`'s evaluations: the
    training and new tables with p-values, ``combined`` and ``ood``."""
    from mace_ood.score.calibrate import calibrate_run
    from mace_ood.score.tables import evaluation_table

    tables = {e.label: evaluation_table(files[e.label], e.family, e.dataset, e.reference, None, metadata=False)
              for e in (own, new)}
    calibrate_run(tables, [own, new], files, select)
    return tables[own.label], tables[new.label]
