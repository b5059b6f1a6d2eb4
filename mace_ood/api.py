"""The Python API: open a finished run, and score structures held in memory against it.

>>> import mace_ood
>>> run = mace_ood.open_run("runs/example")
>>> run.scores.head()                               # scores.csv
>>> run.selected("MACE_T1", "T2")                   # the picks, in order
>>> table = run.score(frames, family="MACE_T1")     # a list of ase.Atoms: scores.csv's columns

``Run.score`` runs the family's models (the files, head, dtype, layers and force setting the run
used, checked by SHA-256) on the structures in memory, computes every score against the run's
reference and calibrates them against the run's calibration split: no Prefect, no Dask cluster,
no file written. The numbers equal what a run over the same structures gives.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes

from mace_ood.config import RunConfig
from mace_ood.extract.runner import LatentExtractor
from mace_ood.extract.stream import non_finite_output
from mace_ood.metadata import info_fields
from mace_ood.paths import RunPaths, evaluation_label
from mace_ood.records import EvaluationPlan
from mace_ood.report.tables import order_columns
from mace_ood.score.calibrate import add_percentiles, training_atom_calibration
from mace_ood.score.compute import compute_scores
from mace_ood.score.errors import ErrorModel, add_predicted_errors
from mace_ood.score.reference import FamilyReference
from mace_ood.score.tables import evaluation_table, rank_table, table_from_scores
from mace_ood.select.table import read_selection, read_selection_summary
from mace_ood.structures import check_structure


class RunError(ValueError):
    """A run directory that cannot be used (not finished, or a family it does not have)."""


@dataclass
class FamilyModels:
    """What a family's models were run with: per seed the model file and its SHA-256, and the
    settings that change the numbers."""

    files: list[str]
    sha256: list[str]
    head: str | None
    default_dtype: str
    layers: str
    forces: bool


@dataclass
class Run:
    """A finished run directory (``mace-ood run``): its config, tables, selection and reference."""

    path: Path
    config: RunConfig
    _extractors: dict = field(default_factory=dict, repr=False)
    _calibrations: dict = field(default_factory=dict, repr=False)
    _error_models: dict = field(default_factory=dict, repr=False)
    _models: dict = field(default_factory=dict, repr=False)

    @property
    def paths(self) -> RunPaths:
        """Where each of the run's files is."""
        return RunPaths(self.path)

    @property
    def scores(self) -> pd.DataFrame:
        """Every structure of every evaluation (``scores.csv``)."""
        return pd.read_csv(self.paths.scores_csv, keep_default_na=True)

    def selected(self, family: str | None = None, dataset: str | None = None) -> pd.DataFrame:
        """The picked structures in pick order (``selected`` = 1, 2, ...), of one evaluation or all."""
        table = self.scores
        table = table[table["selected"].fillna(0) > 0]
        if family is not None:
            table = table[table["family"] == family]
        if dataset is not None:
            table = table[table["dataset"] == dataset]
        return table.sort_values(["family", "dataset", "selected"]).reset_index(drop=True)

    def selection(self, family: str, dataset: str) -> pd.DataFrame:
        """What the run's select stage decided for one evaluation: every structure, in rank order,
        with every score, percentile, p-value, ``ood`` and the pick fields."""
        self.trained_on(family)
        return read_selection(self.path, evaluation_label(family, dataset))

    def trained_on(self, family: str) -> str:
        if family not in self.config.model_families:
            raise RunError(f"{self.path}: no family {family!r} (has {', '.join(self.config.model_families)})")
        return self.config.model_families[family].trained_on

    def reference(self, family: str) -> FamilyReference:
        """The family's reference (alignment, covariance, GMM, k-NN set; fitted on the fit split)."""
        self.trained_on(family)
        path = self.paths.reference(family)
        if not path.is_file():
            raise RunError(f"{path}: missing (was the run finished with reference scores?)")
        return FamilyReference.load(path)

    def models(self, family: str) -> FamilyModels:
        """The model files and settings the run extracted the family's training set with."""
        if family not in self._models:
            self._models[family] = self._read_models(family)
        return replace(self._models[family])

    def _read_models(self, family: str) -> FamilyModels:
        folder = self.paths.latent(family, self.trained_on(family), 0).parent
        seed_files = sorted(folder.glob("seed-*.nc"), key=lambda p: int(p.stem.split("-")[1]))
        if not seed_files:
            raise RunError(f"{folder}: no latent files (was the run finished?)")
        attrs = []
        for path in seed_files:
            with xr.open_dataset(path, engine="netcdf4") as ds:
                attrs.append(dict(ds.attrs))
        settings = json.loads(attrs[0]["extraction_settings"])
        return FamilyModels(
            files=[a["model_file"] for a in attrs], sha256=[a["model_sha256"] for a in attrs],
            head=attrs[0].get("head") or None, default_dtype=attrs[0]["default_dtype"],
            layers=settings.get("layers", "last"), forces=bool(settings.get("forces", False)),
        )

    def score(
        self, structures: list[Atoms], family: str, device: str = "cpu", batch_size: int = 16,
        ids: list[str] | None = None,
    ) -> pd.DataFrame:
        """Every score of ``structures`` for ``family``, calibrated against the run: the columns of
        ``scores.csv`` (``dataset`` = ``memory``), ranked by ``select.score``.

        ``ids``: structure ids (default ``atoms.info["structure_id"]``, else ``memory@<i>``).
        A structure the models cannot score raises, naming it.
        """
        return self._evaluate(structures, family, device, batch_size, ids)[0]

    def _evaluate(
        self, structures: list[Atoms], family: str, device: str = "cpu", batch_size: int = 16,
        ids: list[str] | None = None, forces: bool | None = None,
    ) -> tuple[pd.DataFrame, xr.Dataset, xr.Dataset]:
        """The ranked table, the in-memory latents (and forces) and the scores Dataset."""
        structures = list(structures)
        if not structures:
            raise ValueError("no structures to score")
        ids = ids or [str(a.info.get("structure_id", f"memory@{i}")) for i, a in enumerate(structures)]
        models = self.models(family)
        if forces is not None:
            models.forces = forces
        latents = self._latents(structures, ids, models, device, batch_size)
        reference, own_table, atom_calibration = self._calibration(family)
        with dask.config.set(scheduler="synchronous"):
            scores = compute_scores(latents, reference, device).compute()
        own = EvaluationPlan(family, self.trained_on(family), True, ())
        new = EvaluationPlan(family, "memory", False, ())
        tables = {
            own.label: own_table.copy(),
            new.label: table_from_scores(scores, family, new.dataset, False, self.config.metadata.patterns),
        }
        add_percentiles(tables, [own, new], self.config.select, {family: atom_calibration},
                        self.config.scores.split_block_frames)
        table = rank_table(tables[new.label], self.config.select.score)
        error_model = self._error_model(family)
        if error_model is not None:  # the run's predicted force error, fitted on the family's validation set
            add_predicted_errors(table, error_model)
        return order_columns(table, self.config.select.score), latents, scores

    def _error_model(self, family: str) -> ErrorModel | None:
        """The family's predicted-error map (read once: an MD loop asks every step)."""
        if family not in self._error_models:
            own = EvaluationPlan(family, self.trained_on(family), True, ())
            try:
                model = read_selection_summary(self.path, own.label).get("error_model")
            except FileNotFoundError:
                model = None
            self._error_models[family] = ErrorModel.from_dict(model) if model else None
        return self._error_models[family]

    def _calibration(self, family: str) -> tuple[FamilyReference, pd.DataFrame, dict]:
        """The family's reference, its training-set table and calibration atoms (read once)."""
        if family not in self._calibrations:
            own_label = EvaluationPlan(family, self.trained_on(family), True, ()).label
            own_file = self.paths.scores(own_label)
            if not own_file.is_file():
                raise RunError(f"{own_file}: missing (was the run finished with reference: true?)")
            table = evaluation_table(own_file, family, self.trained_on(family), True, None,
                                     self.config.metadata.patterns)
            atoms = training_atom_calibration(table, own_file, self.config.select, self.config.scores.split_block_frames)
            self._calibrations[family] = (self.reference(family), table, atoms)
        return self._calibrations[family]

    def _extractor(self, path: str, sha: str, models: FamilyModels, device: str) -> LatentExtractor:
        key = (path, sha, device)
        if key not in self._extractors:
            self._extractors[key] = LatentExtractor(
                path, device, models.default_dtype, models.layers, compute_forces=models.forces,
                expected_sha256=sha, head=models.head,
            )
        return self._extractors[key]

    def _latents(self, structures: list[Atoms], ids: list[str], models: FamilyModels, device: str,
                 batch_size: int) -> xr.Dataset:
        per_seed = []
        for path, sha in zip(models.files, models.sha256, strict=True):
            extractor = self._extractor(path, sha, models, device)
            allowed = set(extractor.atomic_numbers)
            outputs = []
            for start in range(0, len(structures), batch_size):
                chunk = structures[start : start + batch_size]
                for offset, atoms in enumerate(chunk):
                    reason = check_structure(atoms, allowed)
                    if reason is not None:
                        raise ValueError(f"{ids[start + offset]}: {reason}")
                outputs += extractor.outputs([extractor.graph(a) for a in chunk], structures=chunk)
            for sid, output in zip(ids, outputs, strict=True):
                reason = non_finite_output(output)
                if reason is not None:
                    raise ValueError(f"{sid}: {reason}")
            per_seed.append(outputs)
        counts = np.array([len(a) for a in structures], dtype=np.int64)
        out = xr.Dataset({"latent": (("seed", "atom", "feature"), da.from_array(
            np.stack([np.concatenate([o["latent"] for o in outputs]) for outputs in per_seed]),
            chunks=(-1, max(1, int(self.config.chunk_atoms)), -1)))})
        if models.forces:
            out["forces"] = (("seed", "atom", "xyz"), da.from_array(np.stack(
                [np.concatenate([o["forces"] for o in outputs]) for outputs in per_seed])))
            out["node_energy"] = (("seed", "atom"), da.from_array(np.stack(
                [np.concatenate([o["node_energy"] for o in outputs]) for outputs in per_seed])))
            out["energy"] = (("seed", "structure"), np.array([[o["energy"] for o in outputs] for outputs in per_seed]))
        if all("layer_energy" in o for outputs in per_seed for o in outputs):
            out["layer_energy"] = (("seed", "atom", "layer"), da.from_array(np.stack(
                [np.concatenate([o["layer_energy"] for o in outputs]) for outputs in per_seed]),
                chunks=(-1, max(1, int(self.config.chunk_atoms)), -1)))
        structure_fields = {
            "structure_id": np.array(ids, dtype=object),
            "source_file": np.array([str(a.info.get("source_file", "")) for a in structures], dtype=object),
            "formula": np.array([a.get_chemical_formula() for a in structures], dtype=object),
            "info_json": np.array([json.dumps(info_fields(a.info)) for a in structures], dtype=object),
            "structure_hash": np.array([""] * len(structures), dtype=object),
            "frame_index": np.arange(len(structures), dtype=np.int64),
            "atom_offset": np.r_[0, np.cumsum(counts)[:-1]].astype(np.int64),
            "n_atoms": counts,
        }
        for name, values in structure_fields.items():
            out[name] = ("structure", values)
        return out


def open_run(path: str | Path) -> Run:
    """A finished run directory: ``run_config.json``, ``run.json`` saying it finished, ``scores.csv``,
    ``reference/``, ``scores/``."""
    from mace_ood.plan import run_status

    path = Path(path)
    paths = RunPaths(path)
    status = run_status(path)
    if not paths.manifest.is_file() or not paths.scores_csv.is_file() or status not in ("complete", None):
        state = f"run.json says {status!r}" if status else "needs run_config.json and scores.csv"
        raise RunError(f"{path}: not a finished mace-ood run ({state}; run its config again to finish it: "
                       "finished work is reused)")
    return Run(path, RunConfig.model_validate_json(paths.manifest.read_text()))


class OODCalculator(Calculator):
    """An ASE calculator around a finished run's family: the ensemble-mean energy and forces, and
    the OOD verdict of every call, calibrated like the run's (``select.alpha``, ``select.score``).

    ``results`` holds ``energy``, ``forces`` (mean over seeds, eV and eV/Å) and, per structure,
    ``ood`` (bool), ``ood_pvalue``, ``ood_score`` (the ranking score), ``force_deviation_max``
    (eV/Å) and every score of ``scores.csv`` as ``mace_ood_<score>``; per atom,
    ``mace_ood_atom_<score>`` arrays. Stop an MD run at the first frame flagged ``ood``::

        atoms.calc = mace_ood.OODCalculator(mace_ood.open_run("runs/example"), "MACE_T1")
        dynamics = Langevin(atoms, 2 * units.fs, temperature_K=600, friction=0.01)
        for _ in dynamics.irun(steps=10_000):
            if atoms.calc.results["ood"]:
                ase.io.write("first_ood_frame.extxyz", atoms)
                break
    """

    implemented_properties = ["energy", "free_energy", "forces"]

    def __init__(self, run: Run | str | Path, family: str, device: str = "cpu", **kwargs) -> None:
        super().__init__(**kwargs)
        self.run = run if isinstance(run, Run) else open_run(run)
        self.family = family
        self.device = device
        self.run.trained_on(family)

    def calculate(self, atoms=None, properties=None, system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        table, latents, scores = self.run._evaluate([self.atoms], self.family, self.device, 1, ids=["md"],
                                                    forces=True)
        row = table.iloc[0]
        score = self.run.config.select.score
        self.results = {
            "energy": float(latents["energy"].values.mean()),
            "free_energy": float(latents["energy"].values.mean()),
            "forces": np.asarray(latents["forces"].values).mean(axis=0),
            "ood": bool(row["ood"]),
            "ood_pvalue": float(row[f"{score}_pvalue"]),
            "ood_score": float(row[score]),
        }
        for name in table.columns:
            if name in scores or name == score or name.endswith(("_pvalue", "_percentile")):
                value = row[name]
                if isinstance(value, (int, float, np.floating, np.integer, np.bool_)):
                    self.results[f"mace_ood_{name}"] = float(value)
        self.results["force_deviation_max"] = float(row.get("force_deviation_max", np.nan))
        for name in scores.data_vars:
            if str(name).startswith("atom_"):
                self.results[f"mace_ood_{name}"] = np.asarray(scores[name].values)
