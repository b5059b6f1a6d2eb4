"""The score stage, files in and files out: fit a family's reference, score one evaluation."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import xarray as xr

from mace_ood.config import ScoresConfig
from mace_ood.files import atomic_path
from mace_ood.paths import RunPaths
from mace_ood.records import EvaluationPlan
from mace_ood.runs import find_groups
from mace_ood.runtime import hdf5_in_this_thread
from mace_ood.score.compute import compute_scores
from mace_ood.score.latents import open_latents
from mace_ood.score.reference import (
    FIT,
    IN_SAMPLE,
    OUT_OF_FOLD,
    FamilyReference,
    assign_folds,
    fit_reference,
    llpr_calibration_folds,
)

log = logging.getLogger(__name__)


@hdf5_in_this_thread()
def fit_family_reference(
    evaluation: EvaluationPlan, output_dir: str | Path, scores: ScoresConfig,
    validation: EvaluationPlan | None = None, energy_key: str = "REF_energy",
) -> str:
    """Fit the family's reference (alignment, covariance, GMM, k-NN sample, LLPR) on its own training
    set, with one fold reference per fold of whole groups (runs, :func:`mace_ood.runs.find_groups`);
    each training structure's group and fold are stored with it. LLPR's alpha is calibrated on
    ``validation`` (the family's labelled dataset) when given, else on the first folds
    (:func:`mace_ood.score.reference.llpr_calibration_folds`), which its fit leaves out."""
    with open_latents(list(evaluation.latent_paths)) as latents:
        ids = latents["structure_id"].values.astype(str)
        grouping = find_groups(latents["source_file"].values.astype(str), latents["frame_index"].values,
                               scores.group_by, scores.split_block_frames, latents["n_atoms"].values,
                               latents["formula"].values.astype(str), latents["info_json"].values.astype(str))
        fold = assign_folds(grouping.labels, scores.folds, scores.split_seed)
        counts = latents["n_atoms"].values.astype(np.int64)
        reference = fit_reference(
            latents["latent"], max_atoms=scores.reference_max_atoms, knn_k=scores.knn_k, ridge=scores.ridge,
            gmm_components=tuple(scores.gmm_components), gmm_max_atoms=scores.gmm_max_atoms,
            atom_fold=np.repeat(fold, counts),
        )
        calibrating = fold < llpr_calibration_folds(len(reference.folds))
        side = np.where(calibrating, OUT_OF_FOLD, FIT) if reference.folds else np.full(len(ids), FIT)
        reference.llpr = _fit_llpr(latents, side, validation, energy_key, evaluation.family)
    reference.calibration_ids = list(ids)
    reference.calibration_in_sample = not reference.folds
    reference.structure_fold = dict(zip(ids.tolist(), fold.tolist(), strict=True))
    reference.structure_group = dict(zip(ids.tolist(), grouping.labels.tolist(), strict=True))
    reference.grouping = grouping.describe()
    reference.grouping_notes = list(grouping.notes)
    n_folds = len(reference.folds)
    log.info("%s: %d training structures in %s; %s", evaluation.family, len(ids), reference.grouping,
             f"scored out of fold over {n_folds} folds" if n_folds else
             "one group: calibrated in-sample, the ood flag is optimistic")
    for note in grouping.notes:
        log.warning("%s: %s", evaluation.family, note)
    return str(reference.save(RunPaths(output_dir).reference(evaluation.family)))


def _fit_llpr(latents: xr.Dataset, side: np.ndarray, validation: EvaluationPlan | None, energy_key: str,
              family: str) -> list | None:
    from mace_ood.score.llpr import fit_family_llpr

    fit, calibration = side == FIT, side == OUT_OF_FOLD
    if not calibration.any():
        fit = calibration = np.ones(len(side), dtype=bool)
    opened = open_latents(list(validation.latent_paths)) if validation is not None else None
    try:
        fitted = fit_family_llpr(latents, fit, calibration, opened, energy_key,
                                 validation.dataset if validation is not None else "")
    finally:
        if opened is not None:
            opened.close()
    if fitted is None:
        log.info("%s: no LLPR (the models' readouts are not MACE's standard ones)", family)
    else:
        log.info("%s: LLPR alpha %s, calibrated on %s", family,
                 ", ".join(f"{s.alpha:.3g}" for s in fitted), fitted[0].calibrated_on)
    return fitted


def write_scores_netcdf(scores: xr.Dataset, path: str | Path) -> Path:
    """Compute the lazy scores once and store them (per atom and per structure)."""
    with atomic_path(path) as tmp:
        scores.to_netcdf(tmp, engine="netcdf4")
    return Path(path)


@hdf5_in_this_thread()
def score_evaluation(
    evaluation: EvaluationPlan, output_dir: str | Path, chunk_atoms: int, reference_file: str | None = None,
    device: str = "cpu",
) -> str:
    """Every score of one evaluation, computed once and stored to ``scores/<label>.nc``
    (the k-NN distances on ``device``)."""
    reference = FamilyReference.load(reference_file) if reference_file else None
    with open_latents(list(evaluation.latent_paths), chunk_atoms=chunk_atoms) as latents:
        own = evaluation.reference and reference is not None
        ids = latents["structure_id"].values.astype(str)
        fold = np.array([reference.structure_fold.get(i, -1) for i in ids], dtype=np.int64) if own else None
        if own and (fold < 0).any():
            raise ValueError(f"{evaluation.label}: {ids[fold < 0][0]} is not in the reference's training set: "
                             "refit the reference (the training latents changed since it was fitted)")
        atom_fold = np.repeat(fold, latents["n_atoms"].values) if own and reference.folds else None
        scores = compute_scores(latents, reference, device, atom_fold=atom_fold)
        if own:
            split = OUT_OF_FOLD if reference.folds else IN_SAMPLE
            scores["split"] = ("structure", np.full(len(ids), split, dtype=object))
            scores["fold"] = ("structure", fold)
            scores["group"] = ("structure", np.array([reference.structure_group[i] for i in ids], dtype=object))
        scores.attrs.update({
            "family": evaluation.family, "dataset": evaluation.dataset,
            "reference": int(evaluation.reference), "seed_files": json.dumps(evaluation.latent_paths),
            **({"grouping": reference.grouping} if own else {}),
        })
        return str(write_scores_netcdf(scores, RunPaths(output_dir).scores(evaluation.label)))
